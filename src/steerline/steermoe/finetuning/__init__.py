"""Selective finetuning of the chosen experts' MLP slices, one process or torchrun data parallel.
"""
