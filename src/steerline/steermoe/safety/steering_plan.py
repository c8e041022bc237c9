"""The expert steering plan of a variant from experts.json, with the fallback to the raw
risk_diff ranking when a list the mode needs is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from steerline.steering.experts import SteeringPlan, plan_from_experts


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
