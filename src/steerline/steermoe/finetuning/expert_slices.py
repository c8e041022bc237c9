"""The trainable expert slices of a MoE model: freezing, gradient masks, the slices artifact and
the frozen-weights check.

Freezing (`ExpertSlices`): transformers 5 stores the experts of a layer fused as 3D tensors
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]); every parameter of
the model is frozen except those fused tensors in layers with a listed expert. Autograd still
gives such a tensor a whole [E, ...] gradient, so a post-accumulate hook takes the listed rows
out of it and drops it as soon as its layer's backward is done: one layer's whole gradient is
alive at a time, not every trained layer's (Qwen3-30B-A3B, 18 layers: 0.6B values each). The
optimizer (torch AdamW) only ever sees copies of the listed slices, so frozen slices get no
update, no weight decay and no optimizer state; after each step the updated slices are written
back with `index_copy_`, leaving every other element bit-identical.

Artifact (`save_expert_slices` / `apply_expert_slices`): a safetensors file holding only the
trained expert slices, keyed `<fused parameter name>.<expert>` with the (layer, expert) list in
its metadata; applying it to the base model reproduces the fine-tuned model exactly.

Sharded parameters (FSDP2 DTensors, sharded on the expert dim; finetune_experts.strategy fsdp):
the listed rows are read by gathering the whole tensor (a collective: every rank calls it) and
written into the rows this rank holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from steerline.core.io import save_safetensors
from steerline.model.arch import experts_module, find_routers, moe_shape
from steerline.steering.experts import Expert, check_experts

SLICES_FORMAT = "steerline.expert_slices.v1"


@dataclass
class FusedSlice:
    """Rows `rows` (expert ids) of one fused expert parameter [E, ...]."""

    name: str  # e.g. "model.layers.3.mlp.experts.gate_up_proj"
    param: nn.Parameter
    rows: torch.Tensor  # [n] long, sorted expert ids
    layer: int


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks' shards for a DTensor (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _write_local_rows(param: DTensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Write the listed rows this rank holds of a parameter sharded on dim 0 as FSDP2 shards it
    (torch.chunk: rank r holds rows [r * ceil(E / world), ...))."""
    local = param.to_local()  # [rows held here, ...], a view of the sharded storage
    per = math.ceil(param.shape[0] / param.device_mesh.size())
    lo = param.device_mesh.get_local_rank() * per
    picked = [(j, e - lo) for j, e in enumerate(rows.tolist()) if lo <= e < lo + local.shape[0]]
    if picked:
        src = torch.tensor([j for j, _ in picked], device=values.device)
        dst = torch.tensor([i for _, i in picked], device=local.device)
        local.index_copy_(0, dst, values.index_select(0, src).to(local.device, local.dtype))


class ExpertSlices:
    """The trainable expert slices of a model: freezing, gradient masks, read/write."""

    def __init__(self, model: nn.Module, experts: Sequence[Sequence[int]]) -> None:
        sites = find_routers(model)  # DenseModelError for a dense model
        n_experts, _ = moe_shape(model)
        self.experts = sorted(check_experts(experts, [s.layer for s in sites], n_experts,
                                                   "trained experts"))
        if not self.experts:
            raise ValueError("no experts to train: the list is empty")
        self.n_experts = n_experts
        by_layer: dict[int, list[int]] = {}
        for layer, e in self.experts:
            by_layer.setdefault(layer, []).append(e)
        names = {id(p): n for n, p in model.named_parameters()}
        self.slices: list[FusedSlice] = []
        for layer, rows in sorted(by_layer.items()):
            mod = experts_module(model, layer)
            params = [p for p in mod.parameters(recurse=False) if p.shape[:1] == (n_experts,)]
            if not params or isinstance(mod, nn.ModuleList):
                raise ValueError(
                    f"layer {layer}: experts are not stored fused as [E, ...] tensors "
                    "(transformers >= 5 layout expected)"
                )
            for p in params:
                self.slices.append(FusedSlice(names[id(p)], p, torch.tensor(rows), layer))
        self._handles: list[Any] = []
        self._row_grads: list[torch.Tensor | None] = [None] * len(self.slices)

    def freeze(self, model: nn.Module) -> None:
        """requires_grad only on the fused tensors holding a listed expert; as each one's
        gradient is accumulated, its listed rows are kept and the whole gradient dropped."""
        for p in model.parameters():
            p.requires_grad_(False)
        for i, s in enumerate(self.slices):
            s.param.requires_grad_(True)
            if isinstance(s.param, DTensor):
                # FSDP sets sharded gradients outside autograd (a hook would never fire); only
                # the listed rows of the gradient are ever read (`grads`)
                continue
            self._handles.append(s.param.register_post_accumulate_grad_hook(
                lambda p, i=i: self._take_rows(i, p)))

    def _take_rows(self, i: int, param: torch.Tensor) -> None:
        rows = param.grad.index_select(0, self.slices[i].rows.to(param.device))  # [n, ...]
        held = self._row_grads[i]
        self._row_grads[i] = rows if held is None else held + rows
        param.grad = None

    def zero_grad(self) -> None:
        self._row_grads = [None] * len(self.slices)
        for s in self.slices:
            s.param.grad = None

    def unfreeze_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def values(self) -> list[torch.Tensor]:
        """Copies of the listed rows of every fused tensor ([n, ...] each)."""
        return [_full(s.param.detach()).index_select(0, s.rows.to(s.param.device)).clone()
                for s in self.slices]

    @torch.no_grad()
    def write(self, values: Sequence[torch.Tensor]) -> None:
        for s, v in zip(self.slices, values, strict=True):
            if isinstance(s.param, DTensor):
                _write_local_rows(s.param, s.rows, v)
            else:
                s.param.index_copy_(0, s.rows.to(s.param.device), v.to(s.param.device,
                                                                        s.param.dtype))

    def grads(self) -> list[torch.Tensor]:
        """The listed rows' gradients since `zero_grad` ([n, ...] each; zeros where none came)."""
        out = []
        for s, held in zip(self.slices, self._row_grads, strict=True):
            if held is None and s.param.grad is not None:  # DTensor: FSDP's sharded gradient
                held = _full(s.param.grad).index_select(0, s.rows.to(s.param.device))
            out.append(held if held is not None else torch.zeros(
                (len(s.rows),) + tuple(s.param.shape[1:]), dtype=s.param.dtype,
                device=s.param.device))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"<param name>.<expert>": slice} for every listed expert of every fused tensor."""
        out = {}
        for s, v in zip(self.slices, self.values(), strict=True):
            for j, e in enumerate(s.rows.tolist()):
                out[f"{s.name}.{e}"] = v[j].cpu().contiguous()
        return out


def save_expert_slices(
    slices: ExpertSlices, path: str | Path, extra: Mapping[str, Any] | None = None
) -> None:
    """The trained slices only (safetensors), the (layer, expert) list in the metadata."""
    meta = {"format": SLICES_FORMAT, "experts": json.dumps([list(p) for p in slices.experts])}
    if extra:
        meta["info"] = json.dumps(dict(extra))
    save_safetensors(slices.state_tensors(), path, meta)  # sorted header: same bytes every run


def read_slices_experts(path: str | Path) -> list[Expert]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SLICES_FORMAT:
        raise ValueError(f"{path} is not an expert-slices file ({SLICES_FORMAT})")
    return [tuple(p) for p in json.loads(meta["experts"])]  # type: ignore[misc]


@torch.no_grad()
def apply_expert_slices(model: nn.Module, path: str | Path) -> list[Expert]:
    """Write a saved slices file into `model` (in place); returns its (layer, expert) list.
    Every key must name a fused expert parameter of the model and match its slice shape."""
    experts = read_slices_experts(path)
    params = dict(model.named_parameters())
    n_experts, _ = moe_shape(model)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name, _, e = key.rpartition(".")
            if name not in params or not e.isdigit() or int(e) >= n_experts:
                raise ValueError(f"{path}: slice {key!r} does not match an expert of this model")
            p, t = params[name], f.get_tensor(key)
            if tuple(t.shape) != tuple(p.shape[1:]):
                raise ValueError(f"{path}: slice {key!r} has shape {tuple(t.shape)}, the model's "
                                 f"is {tuple(p.shape[1:])}")
            p[int(e)] = t.to(p.dtype)
    return experts


def _expert_of_key(key: str) -> tuple[int, int] | None:
    """(layer, expert) of an on-disk per-expert key (`model.layers.L.mlp.experts.E.<w>`), or of a
    slices key (`model.layers.L.mlp.experts.<fused>.E`)."""
    parts = key.split(".")
    if "experts" not in parts or "layers" not in parts:
        return None
    layer = int(parts[parts.index("layers") + 1])
    after = parts[parts.index("experts") + 1:]
    for p in (after[0], after[-1]):
        if p.isdigit():
            return layer, int(p)
    return None


def compare_state_dicts(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
    experts: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Every tensor outside the listed experts' slices must be bit-identical. Keys may be the
    fused in-memory layout ([E, ...] tensors: rows compared) or the per-expert on-disk layout."""
    if set(base) != set(tuned):
        raise ValueError(f"the two models have different tensors: "
                         f"{sorted(set(base) ^ set(tuned))[:5]}")
    listed = {tuple(p) for p in experts}
    compared = changed_slices = 0
    diff: list[str] = []
    for key in sorted(base):
        a, b = base[key], tuned[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            diff.append(key)
            continue
        owner = _expert_of_key(key)
        if owner is not None and owner in listed:
            changed_slices += int(not torch.equal(a, b))
            continue
        if ".experts." in key and owner is None and a.dim() >= 1:  # fused [E, ...]
            layer = int(key.split(".")[key.split(".").index("layers") + 1])
            rows = [e for (lay, e) in listed if lay == layer]
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[rows] = False
            changed_slices += sum(int(not torch.equal(a[e], b[e])) for e in rows)
            a, b = a[keep], b[keep]
        compared += 1
        if not torch.equal(a, b):
            diff.append(key)
    return {"tensors_compared": compared, "identical_outside_slices": not diff,
            "differing": diff[:10], "changed_slices": changed_slices}
