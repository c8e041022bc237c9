"""Routing capture: the routing store's schema, capture shards, and the in-process and data-parallel
captures.
"""
