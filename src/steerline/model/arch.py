"""The model layer: where decoder layers and routers of a transformers model live, and how
to read top-k from a router.

transformers 5 routers (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE...) are `mlp.gate` modules whose
forward returns (router_logits, top_k_weights, top_k_index); older or custom blocks have a plain
Linear gate returning logits only, for which top-k is recomputed with the config's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Attribute paths of the router inside a decoder layer, by architecture family.
ROUTER_PATHS = ("mlp.gate", "block_sparse_moe.gate")


@dataclass(frozen=True)
class RouterSite:
    layer: int
    name: str  # hook-site name, e.g. "model.layers.3.mlp.gate"
    module: nn.Module


class DenseModelError(ValueError):
    """An MoE-only stage was given a dense model."""


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def moe_shape(model: nn.Module) -> tuple[int, int]:
    """(n_experts, top_k) from the config, under its several spellings."""
    cfg = model.config
    n_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not n_experts or not top_k:
        raise DenseModelError(
            f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')}) is a dense model: this "
            "stage needs a Mixture-of-Experts model (e.g. models/moe from build_models, or an "
            "OLMoE / Qwen3-MoE / Mixtral checkpoint)"
        )
    return int(n_experts), int(top_k)


def find_routers(model: nn.Module) -> list[RouterSite]:
    """One RouterSite per MoE decoder layer, in layer order."""
    moe_shape(model)
    layers = model.model.layers
    sites = []
    for i, layer in enumerate(layers):
        for path in ROUTER_PATHS:
            mod = _get(layer, path)
            if mod is not None:
                sites.append(RouterSite(i, f"model.layers.{i}.{path}", mod))
                break
    if not sites:
        raise DenseModelError(
            f"no router modules ({' or '.join(ROUTER_PATHS)}) found in {type(model).__name__}: "
            "this stage needs a Mixture-of-Experts model"
        )
    if len(sites) != len(layers):
        # Mixed dense/MoE stacks (mlp_only_layers) would misalign the layer-major routing rows.
        raise DenseModelError(
            f"only {len(sites)} of {len(layers)} layers have a router; models with dense layers "
            "in between are not supported by the routing contract"
        )
    return sites


def router_topk(
    output: object, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, E], top-k ids [N, k], top-k weights [N, k]) from a router's forward output."""
    if isinstance(output, tuple) and len(output) == 3:
        logits, weights, ids = output
        return logits, ids, weights
    logits = output[0] if isinstance(output, tuple) else output
    logits = logits.reshape(-1, logits.shape[-1])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, ids, weights


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (Llama, Qwen, Mixtral, OLMoE, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} decoder layers "
                         f"(valid: 0..{n - 1})")
    return layer
