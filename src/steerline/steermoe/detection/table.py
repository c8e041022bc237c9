"""The risk_diff report: one row per (layer, expert), its columns per contrast, and the summary.

For every (layer, expert): a[label] = in-scope tokens of that label whose top-k at that layer
holds the expert, n[label] = in-scope tokens; risk_diff = a_unsafe/n_unsafe - a_safe/n_safe.

Inference is at the level of prompts (tokens of one prompt are not independent): per pair a
label-permutation p-value (`p_perm`, BH `q_perm`) and a bootstrap CI over prompts (`ci_low`,
`ci_high`), see inference. The two-proportion z-test over tokens is kept beside them as
`p_token_z` / `q_token_z` (anti-conservative: it counts every token as an independent draw).
The same columns, prefixed, hold the style-matched contrast (`matched_*`) and the pure style
contrast (`style_risk_diff`), see contrasts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from steerline.steermoe.data.contrasts import AGREEMENT_PAIRS, CONTRASTS, Contrast, agreement
from steerline.steermoe.detection.counts import PromptCounts, column_sums
from steerline.steermoe.detection.inference import (
    SequentialStop,
    bh_qvalues,
    bootstrap_ci,
    permutation_test,
    sequential_permutation_test,
    two_proportion_pvalue,
)
from steerline.steermoe.routing.schema import META_MODEL, moe_layers_of

CONTRAST_BY_NAME = {c.name: c for c in CONTRASTS}
REPORT_COLUMNS = (
    "layer",
    "expert",
    "a_safe",
    "a_unsafe",
    "n_safe",
    "n_unsafe",
    "a_safe_n",
    "a_unsafe_n",
    "risk_diff",
    "ci_low",
    "ci_high",
    "p_perm",
    "q_perm",
    "p_token_z",
    "q_token_z",
)
# Per contrast with inference (columns prefixed by Contrast.prefix; pooled's prefix is "").
INFERENCE_COLUMNS = ("risk_diff", "ci_low", "ci_high", "p_perm", "q_perm", "p_token_z", "q_token_z")


def risk_diff_table(counts: PromptCounts) -> pd.DataFrame:
    """One row per (layer, expert) with REPORT_COLUMNS, sorted by layer, expert; the
    prompt-level columns (ci_low, ci_high, p_perm, q_perm) are NaN (compute_risk_diff fills
    them)."""
    (a_safe, a_unsafe), (n_safe, n_unsafe) = counts.pooled()
    rate_safe, rate_unsafe = a_safe / n_safe, a_unsafe / n_unsafe
    p = two_proportion_pvalue(a_safe, n_safe, a_unsafe, n_unsafe)
    size = a_safe.size
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(moe_layers_of(counts.routing_meta), dtype=np.int32),
                               counts.n_experts),
            "expert": np.tile(np.arange(counts.n_experts, dtype=np.int32), counts.n_layers),
            "a_safe": a_safe,
            "a_unsafe": a_unsafe,
            "n_safe": np.full(size, n_safe, np.int64),
            "n_unsafe": np.full(size, n_unsafe, np.int64),
            "a_safe_n": rate_safe,
            "a_unsafe_n": rate_unsafe,
            "risk_diff": rate_unsafe - rate_safe,
            "ci_low": np.full(size, np.nan),
            "ci_high": np.full(size, np.nan),
            "p_perm": np.full(size, np.nan),
            "q_perm": np.full(size, np.nan),
            "p_token_z": p,
            "q_token_z": bh_qvalues(p),
        },
        columns=list(REPORT_COLUMNS),
    )


def contrast_columns(
    counts: PromptCounts,
    contrast: Contrast,
    sides: np.ndarray,
    n_permutations: int,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
    stop: SequentialStop | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    """The report columns of one contrast (named with its prefix), its permutation null
    [n_permutations] (max |risk_diff|) and its prompt/token counts per side.

    With `stop`, p_perm is inference.sequential_permutation_test's (the null is the same), and
    the counts also say how far the shuffles went: refined_columns drew beyond n_permutations,
    max_draws is the most any column drew.

    sides [P]: 1 case, 0 reference, -1 left out (contrasts.contrast_sides). Random streams are
    seeded by (seed, contrast index, purpose), so adding a contrast changes no other one.
    """
    keep = sides >= 0
    # the prompts taking part, by index: the [P, C] matrix is never copied (only column blocks)
    rows = None if keep.all() else np.flatnonzero(keep)
    tok, case = counts.tokens[keep], sides[keep] == 1
    mat = counts.counts
    a_case = column_sums(mat, sides == 1)  # [C]
    a_ref = column_sums(mat, sides == 0)
    n_case, n_ref = int(tok[case].sum()), int(tok[~case].sum())
    rd = a_case / n_case - a_ref / n_ref
    sizes = {
        "prompts_case": int(case.sum()),
        "prompts_reference": int((~case).sum()),
        "tokens_case": n_case,
        "tokens_reference": n_ref,
    }
    cols: dict[str, np.ndarray] = {f"{contrast.prefix}risk_diff": rd}
    null = np.zeros(0)
    if contrast.inferred:
        index = CONTRASTS.index(contrast)
        rng = np.random.default_rng([seed, index, 0])
        if stop is None:
            perm = permutation_test(mat, tok, case, n_permutations, rng, rows=rows)
        else:
            perm = sequential_permutation_test(mat, tok, case, n_permutations, rng, stop,
                                               rows=rows)
            sizes["refined_columns"] = int((perm.n_drawn > n_permutations).sum())
            sizes["max_draws"] = int(perm.n_drawn.max(initial=0))
        low, high = bootstrap_ci(
            mat, tok, case, n_bootstrap, np.random.default_rng([seed, index, 1]), ci_level,
            rows=rows,
        )
        p_z = two_proportion_pvalue(a_ref, n_ref, a_case, n_case)
        values = {
            "ci_low": low,
            "ci_high": high,
            "p_perm": perm.p_value,
            "q_perm": bh_qvalues(perm.p_value) if n_permutations > 0 else perm.p_value,
            "p_token_z": p_z,
            "q_token_z": bh_qvalues(p_z),
        }
        cols.update({f"{contrast.prefix}{k}": v for k, v in values.items()})
        null = perm.null_max
    return cols, null, sizes


def _top_rows(df: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    top = df.reindex(df["risk_diff"].abs().sort_values(ascending=False, kind="stable").index)
    return [
        {
            "layer": int(r.layer),
            "expert": int(r.expert),
            "risk_diff": float(r.risk_diff),
            "ci_low": float(r.ci_low),
            "ci_high": float(r.ci_high),
            "q_perm": float(r.q_perm),
            "q_token_z": float(r.q_token_z),
        }
        for r in top.head(n).itertuples()
    ]


def _significant(df: pd.DataFrame, prefix: str, alpha: float) -> dict[str, int]:
    """Pairs with q <= alpha at prompt level (permutations) and at token level (z-test)."""
    perm = (df[f"{prefix}q_perm"] <= alpha).to_numpy()
    token = (df[f"{prefix}q_token_z"] <= alpha).to_numpy()
    return {
        "q_perm": int(perm.sum()),
        "q_token_z": int(token.sum()),
        "token_only": int((token & ~perm).sum()),
    }


def contrast_agreement(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Spearman and top-n overlap of the risk differences of each pair of contrasts present."""
    out = {}
    for first, second in AGREEMENT_PAIRS:
        cols = [f"{CONTRAST_BY_NAME[name].prefix}risk_diff" for name in (first, second)]
        if all(c in df.columns for c in cols):
            out[f"{first}_{second}"] = agreement(df[cols[0]].to_numpy(), df[cols[1]].to_numpy())
    return out


def risk_diff_summary(df: pd.DataFrame, meta: Mapping[str, str], alpha: float = 0.05) -> dict:
    """Small metrics dict for reports/risk_diff_summary.json (flat keys DVC can diff)."""
    null_q = json.loads(meta.get("null_quantiles", "{}"))
    summary: dict[str, Any] = {
        "token_scope": meta["token_scope"],
        "model": meta.get(META_MODEL, ""),
        "tokens": {"safe": int(meta["n_tokens_safe"]), "unsafe": int(meta["n_tokens_unsafe"])},
        "prompts": {"safe": int(meta["n_prompts_safe"]), "unsafe": int(meta["n_prompts_unsafe"])},
        "max_abs_risk_diff": float(df["risk_diff"].abs().max()),
        "alpha": alpha,
        # pairs with q <= alpha, per contrast: prompt level (q_perm) vs token level (q_token_z)
        "significant": {
            c.name: _significant(df, c.prefix, alpha)
            for c in CONTRASTS
            if c.inferred and f"{c.prefix}q_perm" in df.columns
        },
        # prompts / tokens per side and the null's threshold (the groups are in the metadata)
        "contrasts": {
            name: {k: v for k, v in info.items() if k not in ("case", "reference")}
            for name, info in json.loads(meta.get("contrasts", "{}")).items()
        },
        "agreement": contrast_agreement(df),
        "top": _top_rows(df, 5),
        "null": {
            "n_permutations": int(meta["n_permutations"]),
            # keys without dots so `dvc metrics show` does not split them
            "max_abs_risk_diff": {
                ("max" if k == "max" else "q" + k.replace("0.", "")): v for k, v in null_q.items()
            },
        },
    }
    if "null_threshold" in meta:
        summary["null"]["quantile"] = float(meta["null_quantile"])
        summary["null"]["threshold"] = float(meta["null_threshold"])
        summary["null"]["n_beyond"] = int(meta["n_beyond_null"])
    return summary
