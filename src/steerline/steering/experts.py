"""Inference-time expert steering (SteerMoE), no training: a forward hook on every router.

The rule per MoE family is `steerline.model.families.steer`: for softmax routers the paper's rule
(s = log_softmax(router logits); every expert to activate gets max(s) + delta, every expert to
deactivate min(s) - delta; top-k and weights from the modified scores as the family computes
them), and its documented equivalent for top-k-then-softmax (GPT-OSS, Granite), sparsemixer
(Phi-MoE) and sigmoid group-limited (DeepSeek-V3) routers. At most top_k experts are activated
and at most E - top_k deactivated per layer, so an activated expert is in every token's top-k
and a deactivated one in none. Layers are the model's own decoder-layer numbers (dense layers
have no router and cannot be steered).

The hook lives only inside the `expert_steering()` context manager (removed on exit, also on
errors) and acts on every row the router sees: a whole batch of prompts, each generated token,
teacher-forced scoring alike. transformers 5 routers return (logits, top-k weights, top-k ids):
the hook returns that tuple recomputed by the family's rule; a plain Linear gate returning
logits (older Mixtral-style blocks) gets the steered scores back as float32 logits, from which
its block takes softmax and top-k itself. It is prepended to the router's hooks, so a routing
recorder on the same router sees the steered routing.

Which experts: models/experts.json (select_experts) ranks unsafe experts by risk_diff (highest
first) and safe experts (lowest first); `plan_from_experts` takes the first n of the list(s) the
mode asks for, or, when a list is empty, the first n of the same ranking in
reports/risk_diff.parquet regardless of q-value (recorded in the plan's `source`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from steerline.model.arch import find_routers, moe_shape
from steerline.model.families import RouterRule, check_plan_layer, steer

log = logging.getLogger(__name__)

Expert = tuple[int, int]  # (layer, expert)
Mode = Literal["deactivate_unsafe", "activate_safe", "both"]
MODES: tuple[str, ...] = ("deactivate_unsafe", "activate_safe", "both")


# ---------------------------------------------------------------------------- expert lists


def check_experts(
    experts: Sequence[Sequence[int]], layers: int | Sequence[int], n_experts: int, where: str
) -> list[Expert]:
    """[[layer, expert], ...] as a list of int pairs; one clear error for a malformed or
    out-of-range entry, or a duplicate. `layers`: the MoE layer indices (an int n = 0..n-1)."""
    valid = list(range(layers)) if isinstance(layers, int) else sorted(int(x) for x in layers)
    out: list[Expert] = []
    for item in experts:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise ValueError(
                f"{where}: every entry must be [layer, expert] (two ints), got {item!r}"
            )
        layer, expert = int(item[0]), int(item[1])
        if layer not in valid:
            span = (f"0..{valid[-1]}" if valid == list(range(len(valid))) else
                    ", ".join(map(str, valid)))
            raise ValueError(
                f"{where}: expert {[layer, expert]} names layer {layer}, but the model's "
                f"{len(valid)} MoE layers are {span}"
            )
        if not 0 <= expert < n_experts:
            raise ValueError(
                f"{where}: expert {[layer, expert]} is out of range: the model has {n_experts} "
                f"experts per layer (0..{n_experts - 1})"
            )
        if (layer, expert) in out:
            raise ValueError(f"{where}: expert {[layer, expert]} is listed twice")
        out.append((layer, expert))
    return out


def read_experts_json(path: str | Path) -> dict[str, Any]:
    """models/experts.json with its shape checked ({"unsafe": [...], "safe": [...], ...})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found: run the select_experts stage first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:  # its own message names no file
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}): write "
                         "it as UTF-8 JSON, or rerun select_experts") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict) or not all(
        isinstance(obj.get(k), list) for k in ("unsafe", "safe")
    ):
        raise ValueError(f'{path} must be {{"unsafe": [[layer, expert], ...], "safe": [...]}}')
    return obj


def ranked_from_risk_diff(df: pd.DataFrame, side: Literal["unsafe", "safe"]) -> list[Expert]:
    """Every (layer, expert) on `side` of zero, strongest first (unsafe: highest risk_diff,
    safe: lowest), regardless of q-value; ties by (layer, expert)."""
    for col in ("layer", "expert", "risk_diff"):
        if col not in df.columns:
            raise ValueError(f"risk_diff report has no column {col!r}: rerun risk_diff")
    sub = df[df["risk_diff"] > 0] if side == "unsafe" else df[df["risk_diff"] < 0]
    sub = sub.sort_values(
        ["risk_diff", "layer", "expert"], ascending=[side == "safe", True, True], kind="stable"
    )
    return [(int(r.layer), int(r.expert)) for r in sub.itertuples()]


def expert_list(
    selection: Mapping[str, Any],
    side: Literal["unsafe", "safe"],
    n: int,
    fallback: pd.DataFrame | None,
    n_layers: int | Sequence[int],  # MoE layer indices (an int n = 0..n-1)
    n_experts: int,
) -> tuple[list[Expert], str]:
    """The first n experts of experts.json's `side` list, or of the risk_diff ranking when that
    list is empty (never silently nothing); returns (experts, source)."""
    listed = check_experts(selection[side], n_layers, n_experts, f"experts.json {side!r}")
    if listed:
        return listed[:n], "experts.json"
    if fallback is None:
        raise ValueError(
            f"experts.json has no {side} experts and no risk_diff report was given to fall back on"
        )
    ranked = check_experts(
        ranked_from_risk_diff(fallback, side), n_layers, n_experts, "risk_diff report"
    )
    if not ranked:
        raise ValueError(f"experts.json has no {side} experts and risk_diff ranks none either")
    return ranked[:n], "risk_diff_fallback"  # plan_from_experts logs how many it steers


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SteeringPlan:
    """Experts to force into (activate) / out of (deactivate) the top-k, with the margin delta."""

    activate: tuple[Expert, ...] = ()
    deactivate: tuple[Expert, ...] = ()
    # the margin: params.yaml's expert_steering.delta / finetuned_steering.*.delta reach it
    # through the plan builders; an empty plan needs none
    delta: float | None = None
    source: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def empty(self) -> bool:
        return not self.activate and not self.deactivate

    def per_layer(self) -> dict[int, tuple[list[int], list[int]]]:
        """layer -> (experts to activate, experts to deactivate), sorted."""
        out: dict[int, tuple[list[int], list[int]]] = {}
        for which, pairs in ((0, self.activate), (1, self.deactivate)):
            for layer, expert in pairs:
                out.setdefault(layer, ([], []))[which].append(expert)
        return {k: (sorted(a), sorted(d)) for k, (a, d) in sorted(out.items())}

    def validate(self, n_layers: int | Sequence[int], n_experts: int, top_k: int) -> None:
        """One clear error for an expert out of range, listed twice, both activated and
        deactivated, or more per layer than the top-k can honour."""
        if self.empty:
            return
        if self.delta is None or not (self.delta > 0
                                      and torch.isfinite(torch.tensor(self.delta))):
            raise ValueError(f"steering delta must be a positive finite number, got {self.delta}")
        act = check_experts(self.activate, n_layers, n_experts, "steering plan 'activate'")
        deact = check_experts(self.deactivate, n_layers, n_experts, "steering plan 'deactivate'")
        both = sorted(set(act) & set(deact))
        if both:
            raise ValueError(f"expert {list(both[0])} is both activated and deactivated")
        for layer, (a, d) in self.per_layer().items():
            if len(a) > top_k:
                raise ValueError(
                    f"layer {layer}: {len(a)} experts to activate but only top_k={top_k} are "
                    "routed per token"
                )
            if len(d) > n_experts - top_k:
                raise ValueError(
                    f"layer {layer}: {len(d)} experts to deactivate leaves fewer than top_k="
                    f"{top_k} of {n_experts} experts to route to"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "activate": [list(p) for p in self.activate],
            "deactivate": [list(p) for p in self.deactivate],
            "delta": self.delta,
            "source": dict(self.source),
        }


def _n_pairs(layers: int | Sequence[int], n_experts: int) -> int:
    return (layers if isinstance(layers, int) else len(layers)) * n_experts


def capped(
    experts: Sequence[Expert], cap: int, taken: Mapping[int, int] | None = None
) -> list[Expert]:
    """The experts in order, skipping any that would put more than `cap` in one layer."""
    count = dict(taken or {})
    out = []
    for layer, expert in experts:
        if count.get(layer, 0) < cap:
            out.append((layer, expert))
            count[layer] = count.get(layer, 0) + 1
    return out


# where an expert list of a plan comes from (expert_list's source), for messages
_SOURCE_FILES = {"experts.json": "experts.json", "risk_diff_fallback": "the risk_diff report"}


def plan_from_experts(
    selection: Mapping[str, Any],
    mode: Mode,
    n: int,
    delta: float,
    n_layers: int | Sequence[int],  # MoE layer indices (an int n = 0..n-1)
    n_experts: int,
    top_k: int,
    fallback: pd.DataFrame | None = None,
) -> SteeringPlan:
    """The steering plan the params ask for: the first n unsafe experts to deactivate and/or the
    first n safe experts to activate (per-layer caps applied in rank order)."""
    if mode not in MODES:
        raise ValueError(f"expert_steering.mode must be one of {MODES}, got {mode!r}")
    if n < 1:
        raise ValueError(f"expert_steering.n_experts must be >= 1, got {n}")
    activate: list[Expert] = []
    deactivate: list[Expert] = []
    source: dict[str, str] = {}
    if mode in ("deactivate_unsafe", "both"):
        ranked, source["deactivate"] = expert_list(
            selection, "unsafe", _n_pairs(n_layers, n_experts), fallback, n_layers, n_experts
        )
        deactivate = capped(ranked, n_experts - top_k)[:n]
    if mode in ("activate_safe", "both"):
        ranked, source["activate"] = expert_list(
            selection, "safe", _n_pairs(n_layers, n_experts), fallback, n_layers, n_experts
        )
        activate = capped(ranked, top_k)[:n]
        # an expert on both lists (a hand-edited or merged experts.json: select_experts splits
        # them by the sign of risk_diff) would be forced into and out of the top-k at once
        both = [p for p in activate if p in deactivate]
        if both:
            files = " and ".join(dict.fromkeys(_SOURCE_FILES[source[k]]
                                               for k in ("deactivate", "activate")))
            raise ValueError(
                f"{files}: expert {list(both[0])} (layer, expert) is listed both as unsafe and "
                "as safe, so mode 'both' would deactivate and activate it: remove it from one "
                "list (or rerun select_experts), or steer with deactivate_unsafe or "
                "activate_safe")
    # the count actually steered (after n and the per-layer caps), not the ranking's length
    for which, chosen, side in (("deactivate", deactivate, "unsafe"),
                                ("activate", activate, "safe")):
        if source.get(which) == "risk_diff_fallback":
            log.warning("experts.json lists no %s experts: %sing %d experts from the top of "
                        "the risk_diff ranking instead (regardless of q-value)", side, which[:-1],
                        len(chosen))
    plan = SteeringPlan(tuple(activate), tuple(deactivate), delta, source)
    plan.validate(n_layers, n_experts, top_k)
    return plan


def directional_plan(
    selection: Mapping[str, Any], direction: str, n: int, delta: float,
    n_layers: int | Sequence[int], n_experts: int, top_k: int,
) -> SteeringPlan:
    """Steering of the experts a model routes to more on unsafe prompts (the `unsafe` list of its
    experts.json, rank order): `deactivate` forces the first n out of the top-k, `activate`
    into it (per-layer caps E - top_k and top_k applied in rank order). An empty list is an
    error: there is nothing to steer."""
    if direction not in ("activate", "deactivate"):
        raise ValueError(f"steering direction must be 'activate' or 'deactivate', got "
                         f"{direction!r}")
    if not selection["unsafe"]:
        raise ValueError("the fine-tuned model's experts.json lists no unsafe experts: lower "
                         "select_experts' thresholds or check its risk_diff report")
    ranked, source = expert_list(selection, "unsafe", _n_pairs(n_layers, n_experts), None,
                                 n_layers, n_experts)
    chosen = capped(ranked, top_k if direction == "activate" else n_experts - top_k)[:n]
    plan = SteeringPlan(activate=tuple(chosen) if direction == "activate" else (),
                        deactivate=tuple(chosen) if direction == "deactivate" else (),
                        delta=delta, source={direction: source})
    plan.validate(n_layers, n_experts, top_k)
    return plan


# ---------------------------------------------------------------------------- the hook


def make_router_hook(activate: Sequence[int], deactivate: Sequence[int], delta: float,
                     rule: RouterRule):
    """A forward hook for one router module applying the family's SteerMoE rule."""
    act = torch.as_tensor(list(activate), dtype=torch.long)
    deact = torch.as_tensor(list(deactivate), dtype=torch.long)

    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        if isinstance(output, tuple) and len(output) == 3:
            logits, weights, ids = output  # [N, E], [N, k], [N, k]
            flat = logits.reshape(-1, logits.shape[-1])
            scores, top_i, top_w = steer(flat, rule, act.to(flat.device), deact.to(flat.device),
                                         delta)
            return (
                scores.to(logits.dtype).reshape(logits.shape),
                top_w.to(weights.dtype),
                top_i.to(ids.dtype),
            )
        if isinstance(output, torch.Tensor):
            flat = output.reshape(-1, output.shape[-1])
            # float32: at bf16 resolution (~0.016 near log(1/E)) a 0.01 margin would round away
            scores, _, _ = steer(flat, rule, act.to(flat.device), deact.to(flat.device), delta)
            return scores.reshape(output.shape)
        raise TypeError(
            f"router returned {type(output).__name__}; expected logits or (logits, weights, ids)"
        )

    return hook


@contextlib.contextmanager
def expert_steering(model: nn.Module, plan: SteeringPlan) -> Iterator[SteeringPlan]:
    """Steer `model`'s routers by `plan` inside the block (an empty plan hooks nothing).

    Raises DenseModelError for a dense model and ValueError for a plan the model cannot honour,
    before any hook is registered."""
    sites = {s.layer: s for s in find_routers(model)}
    n_experts, top_k = moe_shape(model)
    plan.validate(sorted(sites), n_experts, top_k)
    per_layer = plan.per_layer()
    for layer, (act, deact) in per_layer.items():
        check_plan_layer(sites[layer].rule, n_experts, act, deact, layer)
    handles = []
    try:
        for layer, (act, deact) in per_layer.items():
            hook = make_router_hook(act, deact, plan.delta, sites[layer].rule)
            handles.append(sites[layer].module.register_forward_hook(hook, prepend=True))
        yield plan
    finally:
        for h in handles:
            h.remove()
