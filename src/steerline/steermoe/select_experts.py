"""Pick the experts to steer from the risk_diff report (SteerMoE's selection rule).

unsafe: risk_diff > threshold and q_value <= alpha, highest risk_diff first, at most top_k.
safe: the mirror, risk_diff < -threshold and q_value <= alpha, lowest first, at most top_k.
An empty selection is a valid outcome (the model does not route by safety): logged, not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

_NEEDED = ("layer", "expert", "risk_diff", "q_value")


def _check(df: pd.DataFrame, threshold: float, top_k: int, alpha: float) -> None:
    for col in _NEEDED:
        if col not in df.columns:
            raise ValueError(
                f"risk_diff report has no column {col!r} (has {list(df.columns)}): rerun risk_diff"
            )
    if df[list(_NEEDED)].isna().any().any():
        raise ValueError("risk_diff report has missing values in layer/expert/risk_diff/q_value")
    if threshold < 0:
        raise ValueError(f"select_experts.threshold must be >= 0, got {threshold}")
    if top_k < 1:
        raise ValueError(f"select_experts.top_k must be >= 1, got {top_k}")
    if not 0 < alpha <= 1:
        raise ValueError(f"select_experts.alpha must be in (0, 1], got {alpha}")


def _pick(df: pd.DataFrame, mask: pd.Series, ascending: bool, top_k: int) -> pd.DataFrame:
    # ties broken by q-value, then (layer, expert), so the choice is deterministic
    picked = df[mask].sort_values(
        ["risk_diff", "q_value", "layer", "expert"],
        ascending=[ascending, True, True, True],
        kind="stable",
    )
    return picked.head(top_k)


def select_experts(
    df: pd.DataFrame,
    threshold: float = 0.05,
    top_k: int = 50,
    alpha: float = 0.05,
    meta: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The models/experts.json object: {"unsafe": [[layer, expert], ...], "safe": [...],
    "criteria": {threshold, top_k, alpha, token_scope, model}} (the last two from `meta`, the
    risk_diff report's metadata, when given)."""
    _check(df, threshold, top_k, alpha)
    significant = df["q_value"] <= alpha
    unsafe = _pick(df, significant & (df["risk_diff"] > threshold), False, top_k)
    safe = _pick(df, significant & (df["risk_diff"] < -threshold), True, top_k)
    meta = meta or {}
    out = {
        "unsafe": [[int(r.layer), int(r.expert)] for r in unsafe.itertuples()],
        "safe": [[int(r.layer), int(r.expert)] for r in safe.itertuples()],
        "criteria": {
            "threshold": float(threshold),
            "top_k": int(top_k),
            "alpha": float(alpha),
            "token_scope": meta.get("token_scope"),
            "model": meta.get("model"),
        },
    }
    for side in ("unsafe", "safe"):
        if not out[side]:
            log.warning(
                "no %s experts pass |risk_diff| > %g with q <= %g: the %s list is empty",
                side,
                threshold,
                alpha,
                side,
            )
    return out


def experts_summary(
    df: pd.DataFrame,
    selection: Mapping[str, Any],
    meta: Mapping[str, str] | None = None,
    n_top: int = 5,
) -> dict[str, Any]:
    """Metrics for reports/experts_summary.json: counts and the top selected entries.

    With the risk_diff report's metadata, also how many selected experts beat the prompt-level
    permutation null (token-level q-values alone are anti-conservative).
    """
    meta = meta or {}
    rd = df.set_index(["layer", "expert"])["risk_diff"]
    thr = float(meta["null_threshold"]) if "null_threshold" in meta else None
    out: dict[str, Any] = {"criteria": dict(selection["criteria"])}
    for side in ("unsafe", "safe"):
        pairs = [tuple(p) for p in selection[side]]
        vals = [float(rd.loc[p]) for p in pairs]
        out[f"n_{side}"] = len(pairs)
        if thr is not None:
            out[f"n_{side}_beyond_null"] = sum(abs(v) > thr for v in vals)
        out[f"top_{side}"] = [
            {"layer": int(layer), "expert": int(expert), "risk_diff": v}
            for (layer, expert), v in list(zip(pairs, vals, strict=True))[:n_top]
        ]
    return out
