"""Loading local checkpoints (safetensors) into transformers models, in eval mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.model.arch import find_routers


def load_causal_lm(path: str | Path, dtype: str = "float32",
                   device: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A local causal LM directory (safetensors) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} not found: run the build_models stage "
                                "or point the params at a local checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_moe(model_path: str | Path, dtype: str = "float32"):
    """MoE model (CPU, eval mode) + tokenizer from a local directory; a missing directory or a
    dense model is rejected before any work."""
    model, tokenizer = load_causal_lm(model_path, dtype, device="cpu")
    find_routers(model)  # DenseModelError with a clear message
    return model, tokenizer
