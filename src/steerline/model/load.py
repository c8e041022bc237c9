"""Loading local checkpoints (safetensors) into transformers models, in eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.model.arch import DenseModelError, find_routers


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


def moe_config(model_path: str | Path) -> dict[str, int]:
    """(n_layers, n_experts, top_k) from a model directory's config.json, without loading any
    weight: a missing directory or config, or a dense model, is rejected before the (slow) load.
    """
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} not found: run the build_models stage "
                                "or point the params at a local checkpoint")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a transformers model "
                                "directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not n_experts or not top_k:
        raise DenseModelError(
            f"{path} ({cfg.get('model_type', '?')}) is a dense model: this stage needs a "
            "Mixture-of-Experts model (e.g. models/moe from build_models, or an OLMoE / "
            "Qwen3-MoE / Mixtral checkpoint)"
        )
    return {"n_layers": int(cfg.get("num_hidden_layers", 0)), "n_experts": int(n_experts),
            "top_k": int(top_k)}
