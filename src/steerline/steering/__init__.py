"""Steering as data and as context managers, for any backend: SteerMoE expert plans and the router
edit, the gated residual-stream module and its hooks, routing capture during generation, and the
per-request Steering a backend receives.
"""
