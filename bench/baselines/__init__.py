"""Named baselines the benches time against (not benches themselves: make bench runs
bench/*.py only)."""
