"""Pick the experts to steer from the risk_diff report (SteerMoE's selection rule).

A contrast passes for the unsafe list when its risk_diff > threshold and its prompt-level
q-value (q_perm, label permutations over prompts) <= alpha; for the safe list the mirror
(risk_diff < -threshold). `require` names the contrasts that must pass (contrasts.py):
- pooled: all unsafe vs all safe prompts (SteerMoE's contrast; mixes safety with style);
- matched: XSTest unsafe vs XSTest safe (look-alike pairs: safety without style);
- both: pooled and matched.
Order: strongest first by the required contrast's risk_diff (with `both`, by the weaker of the
two, so a pair ranks high only if both contrasts say so), at most top_k per list.
An empty selection is a valid outcome (the model does not route by safety): logged, not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from steerline.steermoe.data.contrasts import MATCHED, POOLED, REQUIRE_CHOICES

log = logging.getLogger(__name__)

_BY_REQUIRE = {"pooled": (POOLED,), "matched": (MATCHED,), "both": (POOLED, MATCHED)}


def _needed(require: str) -> list[str]:
    cols = ["layer", "expert"]
    for c in _BY_REQUIRE[require]:
        cols += [f"{c.prefix}risk_diff", f"{c.prefix}q_perm"]
    return cols


def _check(df: pd.DataFrame, threshold: float, top_k: int, alpha: float, require: str) -> None:
    if require not in REQUIRE_CHOICES:
        raise ValueError(
            f"select_experts.require must be one of {REQUIRE_CHOICES}, got {require!r}"
        )
    needed = _needed(require)
    for col in needed:
        if col not in df.columns:
            raise ValueError(
                f"risk_diff report has no column {col!r} (needed by require={require!r}; has "
                f"{list(df.columns)}): rerun risk_diff; the matched contrast needs prompts of "
                "the sources named xstest (and style advbench): with other sources set "
                "select_experts.require: pooled"
            )
    bad = [c for c in needed if df[c].isna().any()]
    if bad:
        hint = " (risk_diff.n_permutations is 0?)" if bad[0].endswith("q_perm") else ""
        raise ValueError(f"risk_diff report has missing values in column {bad[0]!r}{hint}")
    if threshold < 0:
        raise ValueError(f"select_experts.threshold must be >= 0, got {threshold}")
    if top_k < 1:
        raise ValueError(f"select_experts.top_k must be >= 1, got {top_k}")
    if not 0 < alpha <= 1:
        raise ValueError(f"select_experts.alpha must be in (0, 1], got {alpha}")


def _side(
    df: pd.DataFrame, require: str, threshold: float, alpha: float, unsafe: bool, top_k: int
) -> pd.DataFrame:
    sign = 1.0 if unsafe else -1.0
    passes = np.ones(len(df), bool)
    strength = np.full(len(df), np.inf)  # sign * risk_diff of the weakest required contrast
    q = np.zeros(len(df))  # the largest required q, for ties
    for c in _BY_REQUIRE[require]:
        s = sign * df[f"{c.prefix}risk_diff"].to_numpy()
        qc = df[f"{c.prefix}q_perm"].to_numpy()
        passes &= (s > threshold) & (qc <= alpha)
        strength, q = np.minimum(strength, s), np.maximum(q, qc)
    ranked = df.assign(_strength=strength, _q=q)[passes]
    # ties broken by q, then (layer, expert), so the choice is deterministic
    ranked = ranked.sort_values(
        ["_strength", "_q", "layer", "expert"], ascending=[False, True, True, True], kind="stable"
    )
    return ranked.head(top_k)


def select_experts(
    df: pd.DataFrame,
    threshold: float,
    top_k: int,
    alpha: float,
    require: str,
    meta: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The models/experts.json object: {"unsafe": [[layer, expert], ...], "safe": [...],
    "criteria": {threshold, top_k, alpha, require, q_column, token_scope, model}} (the last two
    from `meta`, the risk_diff report's metadata, when given)."""
    _check(df, threshold, top_k, alpha, require)
    unsafe = _side(df, require, threshold, alpha, True, top_k)
    safe = _side(df, require, threshold, alpha, False, top_k)
    meta = meta or {}
    out = {
        "unsafe": [[int(r.layer), int(r.expert)] for r in unsafe.itertuples()],
        "safe": [[int(r.layer), int(r.expert)] for r in safe.itertuples()],
        "criteria": {
            "threshold": float(threshold),
            "top_k": int(top_k),
            "alpha": float(alpha),
            "require": require,
            "q_column": "q_perm",
            "token_scope": meta.get("token_scope"),
            "model": meta.get("model"),
        },
    }
    for side in ("unsafe", "safe"):
        if not out[side]:
            log.warning(
                "no %s experts pass |risk_diff| > %g with prompt-level q <= %g (require %s): the "
                "%s list is empty",
                side,
                threshold,
                alpha,
                require,
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
    max-|risk_diff| permutation null; with matched columns in the report, how many selected
    experts have a matched risk_diff on their side of zero (unsafe: > 0, safe: < 0).
    """
    meta = meta or {}
    rows = df.set_index(["layer", "expert"])
    thr = float(meta["null_threshold"]) if "null_threshold" in meta else None
    matched = f"{MATCHED.prefix}risk_diff"
    out: dict[str, Any] = {"criteria": dict(selection["criteria"])}
    for side in ("unsafe", "safe"):
        pairs = [tuple(p) for p in selection[side]]
        vals = [float(rows.loc[p, "risk_diff"]) for p in pairs]
        out[f"n_{side}"] = len(pairs)
        if thr is not None:
            out[f"n_{side}_beyond_null"] = sum(abs(v) > thr for v in vals)
        if matched in rows.columns:
            sign = 1.0 if side == "unsafe" else -1.0
            out[f"n_{side}_matched_agrees"] = sum(
                sign * float(rows.loc[p, matched]) > 0 for p in pairs
            )
        top = []
        for p, v in list(zip(pairs, vals, strict=True))[:n_top]:
            entry = {"layer": int(p[0]), "expert": int(p[1]), "risk_diff": v}
            if matched in rows.columns:
                entry["matched_risk_diff"] = float(rows.loc[p, matched])
            top.append(entry)
        out[f"top_{side}"] = top
    return out
