"""Routing capture: the routing store's schema, its manifest and checked reads, capture shards, and
the in-process and data-parallel captures.
"""
