"""Handing GPU memory back between two models of one process (a transformers model, then a
vLLM engine that sizes its KV cache from the memory it finds free)."""

from __future__ import annotations

import gc

import torch


def free_gpu() -> None:
    """Collect the dropped model's tensors and return the CUDA cache (no-op without a GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
