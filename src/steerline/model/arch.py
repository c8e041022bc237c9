"""The model layer: where decoder layers, routers and experts of a transformers model live.

A family's knowledge (router site, routing rule, SteerMoE rule) is one entry of
`steerline.model.families.FAMILIES`; this module finds the sites in a loaded model. MoE layers
keep the model's own layer numbers: models with dense layers (DeepSeek's
`first_k_dense_replace`, Qwen2-MoE's `mlp_only_layers`) have routers only on some layers, and
every (layer, expert) pair names the real decoder layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerline.model.families import ROUTER_PATHS, RouterRule, family_of, select


@dataclass(frozen=True)
class RouterSite:
    layer: int  # the decoder layer's own index
    name: str  # hook-site name, e.g. "model.layers.3.mlp.gate"
    module: nn.Module
    rule: RouterRule


class DenseModelError(ValueError):
    """An MoE-only stage was given a dense model."""


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def moe_shape(model: nn.Module, config: Any = None) -> tuple[int, int]:
    """(n_experts, top_k) from the config (default `model.config`), under its several
    spellings."""
    cfg = model.config if config is None else config
    n_experts = (getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
                 or getattr(cfg, "n_routed_experts", None))
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not n_experts or not top_k:
        raise DenseModelError(
            f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')}) is a dense model: this "
            "stage needs a Mixture-of-Experts model (e.g. models/moe from build_models, or an "
            "OLMoE / Qwen3-MoE / Mixtral checkpoint)"
        )
    check_top_k(int(n_experts), int(top_k), f"{type(model).__name__} config")
    return int(n_experts), int(top_k)


def check_top_k(n_experts: int, top_k: int, where: str) -> None:
    """num_experts_per_tok must lie in 1..n_experts: a larger value otherwise fails inside the
    first forward with torch's bare "selected index k out of range"."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"{where}: num_experts_per_tok={top_k} but the model has {n_experts} "
                         f"experts per layer: set num_experts_per_tok to 1..{n_experts} in its "
                         "config.json")


def context_length(config: Any) -> int:
    """The model's positions (max_position_embeddings; a multimodal config's text_config), the
    bound of check_context; 2**30 when the config declares none."""
    if isinstance(config, dict):
        n = config.get("text_config", config).get("max_position_embeddings")
    else:
        n = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings",
                    None)
    return int(n) if n else 1 << 30


def _n_out(mod: nn.Module) -> int | None:
    """A router's number of outputs: its weight's rows, else its declared size (vLLM's CPU
    linear layers repack the weight for oneDNN and leave an empty placeholder)."""
    weight = getattr(mod, "weight", None)
    if weight is not None and weight.ndim == 2 and weight.numel():
        return int(weight.shape[0])
    size = getattr(mod, "output_size", None) or getattr(mod, "out_features", None)
    return int(size) if size else None


def _router_at(layer: nn.Module, n_experts: int) -> tuple[str, nn.Module] | None:
    for path in ROUTER_PATHS:
        mod = _get(layer, path)
        if mod is not None and _n_out(mod) == n_experts:
            return path, mod
    return None


def find_routers(model: nn.Module, config: Any = None) -> list[RouterSite]:
    """One RouterSite per MoE decoder layer, in layer order (dense layers have none).
    `config`: the text config when it is not `model.config` (vLLM's hf_text_config)."""
    config = model.config if config is None else config
    n_experts, _ = moe_shape(model, config)
    sites = []
    for i, layer in enumerate(decoder_layers(model)):
        found = _router_at(layer, n_experts)
        if found is not None:
            path, mod = found
            rule = RouterRule.of(mod, config)
            rule.check(n_experts)
            sites.append(RouterSite(i, f"model.layers.{i}.{path}", mod, rule))
    if not sites:
        raise DenseModelError(
            f"no router modules ({' or '.join(ROUTER_PATHS)}) found in {type(model).__name__}: "
            "this stage needs a Mixture-of-Experts model"
        )
    return sites


def moe_layers(model: nn.Module) -> list[int]:
    """The decoder-layer indices that have a router, ascending."""
    return [s.layer for s in find_routers(model)]


def experts_module(model: nn.Module, layer: int) -> nn.Module:
    """The experts module of MoE layer `layer` (fused [E, ...] parameters in transformers 5)."""
    fam = family_of(model.config)
    block = _get(decoder_layers(model)[layer], fam.moe_block)
    for path in ("experts",):
        mod = _get(block, path) if block is not None else None
        if mod is not None:
            return mod
    raise ValueError(f"layer {layer} has no experts module ({fam.moe_block}.experts)")


def router_topk(
    output: object, rule: RouterRule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, E], top-k ids [N, k], top-k weights [N, k]) from a router's forward output:
    transformers 5 routers return that triple; a plain Linear gate returns logits only, whose
    choice is the family's rule."""
    if isinstance(output, tuple) and len(output) == 3:
        logits, weights, ids = output
        return logits, ids, weights
    logits = output[0] if isinstance(output, tuple) else output
    logits = logits.reshape(-1, logits.shape[-1])
    ids, weights = select(logits, rule)
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


def layer_slice_unsupported(model: nn.Module) -> str | None:
    """Why `layer_slice` cannot run this model, or None when it can.

    A slice renumbers its layers' cache slots from 0, which is exact only when the decoder keeps
    its layers in `<base>.layers` and every layer is of one attention type (the KV cache and
    Qwen-style masks pick a layer's type by its position in the list)."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if decoder is None or getattr(decoder, "layers", None) is not decoder_layers(model):
        return f"{type(model).__name__} keeps its decoder layers outside <base>.layers"
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        return f"{type(model).__name__} mixes attention types {sorted(set(types))}"
    if any(getattr(getattr(lay, "self_attn", None), "layer_idx", None) is None
           for lay in decoder.layers):
        return f"{type(model).__name__}'s layers have no self_attn.layer_idx"
    return None


@contextlib.contextmanager
def layer_slice(model: nn.Module, start: int, stop: int) -> Iterator[None]:
    """Inside the block the model's decoder runs only decoder layers start..stop-1 (then its
    final norm; the embedding is skipped when it is fed `inputs_embeds`).

    The slice's attention layers use KV-cache slots 0..n-1 (transformers numbers them by
    `self_attn.layer_idx`, and reads the cache's length and mask sizes from slot 0), so a fresh
    cache works for the slice. The full layer list and every layer_idx are restored on exit,
    also when the block raises."""
    reason = layer_slice_unsupported(model)
    if reason is not None:
        raise NotImplementedError(f"cannot run a slice of the decoder layers: {reason}")
    decoder = getattr(model, model.base_model_prefix)
    full = decoder.layers
    if not 0 <= start <= stop <= len(full):
        raise ValueError(f"layer slice {start}..{stop} is outside 0..{len(full)}")
    part = list(full)[start:stop]
    old_idx = [lay.self_attn.layer_idx for lay in part]
    decoder.layers = nn.ModuleList(part)
    try:
        for i, lay in enumerate(part):
            lay.self_attn.layer_idx = i
        yield
    finally:
        for lay, idx in zip(part, old_idx, strict=True):
            lay.self_attn.layer_idx = idx
        decoder.layers = full
