"""Detection: per-(layer, expert) counts streamed from the routing store, prompt-level
inference, the risk-difference table and plots, and expert selection.
"""
