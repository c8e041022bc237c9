"""The base layer: file IO (atomic writes, no pickle), the params schema, chat rendering, greedy
generation, user errors, fault injection and the statistics every evaluation uses.
"""
