"""The expert steering plan of a variant from experts.json, with the fallback to the raw
risk_diff ranking when a list the mode needs is empty: `selection_plan` (expert_steering's
modes) and `finetuned_plan` (the fine-tuned model steered by its own unsafe experts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from steerline.steering.experts import (
    SteeringPlan,
    directional_plan,
    plan_from_experts,
    ranked_from_risk_diff,
)


def selection_plan(
    selection: Mapping[str, Any], mode: str, n: int, delta: float, on_empty: str,
    risk_diff: Callable[[], pd.DataFrame], n_layers: int | Sequence[int], n_experts: int,
    top_k: int,
) -> SteeringPlan:
    """expert_steering's plan from experts.json (n_layers: the MoE layers' count, or their
    decoder-layer indices). A list the mode needs that is empty is an error
    unless `on_empty` is "risk_diff_ranking" (then `risk_diff()` is read and its raw ranking
    steered, regardless of q-value; the plan's `source` says so)."""
    sides = {"deactivate_unsafe": ("unsafe",), "activate_safe": ("safe",),
             "both": ("unsafe", "safe")}.get(mode, ())
    empty = [side for side in sides if not selection[side]]
    if empty and on_empty != "risk_diff_ranking":
        raise ValueError(f"experts.json lists no {' or '.join(empty)} experts (select_experts "
                         "kept none): relax select_experts' thresholds, or set "
                         "expert_steering.on_empty_selection: risk_diff_ranking to steer the top "
                         "of the raw risk_diff ranking regardless of q-value")
    return plan_from_experts(selection, mode, n, delta, n_layers, n_experts, top_k,
                             risk_diff() if empty else None)


def check_finetuned_selection(selection: Mapping[str, Any], on_empty: str) -> None:
    """Before any model loads: the fine-tuned model's experts.json has unsafe experts to steer,
    or `on_empty` lets its raw risk_diff ranking stand in."""
    if not selection["unsafe"] and on_empty != "risk_diff_ranking":
        raise ValueError("the fine-tuned model's experts.json lists no unsafe experts "
                         "(select_experts kept none, e.g. few prompts of your own): relax "
                         "select_experts' thresholds, or set expert_steering.on_empty_selection: "
                         "risk_diff_ranking to steer the top of its raw risk_diff ranking")


def finetuned_plan(
    selection: Mapping[str, Any], direction: str, n: int, delta: float, on_empty: str,
    risk_diff: Callable[[], pd.DataFrame], n_layers: int | Sequence[int], n_experts: int,
    top_k: int,
) -> SteeringPlan:
    """finetuned_steering's plan (steering.experts.directional_plan on the `unsafe` list); an
    empty list is an error unless `on_empty` is "risk_diff_ranking": then the fine-tuned
    model's raw risk_diff ranking (`risk_diff()`, regardless of q-value) stands in and the
    plan's `source` says so."""
    check_finetuned_selection(selection, on_empty)
    if selection["unsafe"]:
        return directional_plan(selection, direction, n, delta, n_layers, n_experts, top_k)
    ranked = [list(e) for e in ranked_from_risk_diff(risk_diff(), "unsafe")]
    plan = directional_plan({**selection, "unsafe": ranked}, direction, n, delta, n_layers,
                            n_experts, top_k)
    return replace(plan, source={direction: "risk_diff_fallback"})
