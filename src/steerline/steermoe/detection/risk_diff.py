"""One risk-difference computation: count the routing shards, then tabulate every contrast with
its inference and gather the report's metadata (see counts, table, inference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steerline.steermoe.data.contrasts import (
    CONTRASTS,
    POOLED,
    contrast_sides,
    needs_sources,
    prompt_sources,
    sources_present,
)
from steerline.steermoe.detection.counts import TARGET_SCOPE, count_routing
from steerline.steermoe.detection.inference import (
    SequentialStop,
    check_null_quantile,
    null_quantiles,
)
from steerline.steermoe.detection.table import contrast_columns, risk_diff_table
from steerline.steermoe.routing.schema import PER_SHARD_PREFIX


def compute_risk_diff(
    routing_dir: str | Path,
    token_scope: str = "user",
    n_permutations: int = 1000,
    null_quantile: float = 0.99,
    seed: int = 0,
    batch_rows: int = 16384,
    progress: bool = False,
    prompts: pd.DataFrame | None = None,
    n_bootstrap: int = 0,
    ci_level: float = 0.95,
    p_method: str = "fixed",
    p_max_permutations: int = 20_000,
    p_stop_exceedances: int = 10,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The risk_diff report and its Parquet metadata (all values strings).

    Columns: table.REPORT_COLUMNS (the pooled contrast); with `prompts` (the prompt table:
    prompt_id, label, source) also every other contrast of contrasts.CONTRASTS, prefixed
    (matched_*: table.INFERENCE_COLUMNS, style_risk_diff). n_permutations == 0 / n_bootstrap == 0
    leave p_perm / q_perm / CI columns NaN. p_method "sequential": columns with fewer than
    p_stop_exceedances exceedances among the n_permutations shuffles draw on, up to
    p_max_permutations (inference.sequential_permutation_test); "fixed": n_permutations each.

    Metadata: token_scope, n_layers, top_k, n_experts, model (plus the routing's other shared
    keys), prompt/token counts per label, n_permutations, n_bootstrap, ci_level, seed,
    null_quantile, null_quantiles (JSON {quantile: max |risk_diff|}), contrasts (JSON: per
    contrast its groups, prompt/token counts and null threshold), and, with permutations,
    null_threshold (the quantile `null_quantile` of the pooled null) and n_beyond_null. The
    sequential method adds p_method, p_max_permutations, p_stop_exceedances and per contrast
    refined_columns / max_draws (the fixed method's metadata is as before it existed).
    """
    check_null_quantile(n_permutations, null_quantile)
    if p_method not in ("fixed", "sequential"):
        raise ValueError(f"p_method must be fixed or sequential, got {p_method!r}")
    stop = (SequentialStop(p_max_permutations, p_stop_exceedances)
            if p_method == "sequential" and n_permutations > 0 else None)
    counts = count_routing(routing_dir, token_scope, batch_rows, progress)
    source = None
    if prompts is not None:
        source = prompt_sources(counts.prompt_ids, counts.unsafe, prompts, "the prompt table")
    df = risk_diff_table(counts)
    contrasts: dict[str, Any] = {}
    null = np.zeros(0)
    for contrast in CONTRASTS:
        # the matched / style contrasts compare the xstest / advbench sources' prompts, which
        # have no target span: the target scope (paired chats) has the pooled contrast only
        # and a user's own sources (none named xstest / advbench) have the pooled one only
        if needs_sources(contrast) and (source is None or token_scope == TARGET_SCOPE
                                        or not sources_present(contrast, source)):
            continue
        sides = contrast_sides(contrast, source, counts.unsafe)
        cols, c_null, sizes = contrast_columns(
            counts, contrast, sides, n_permutations, n_bootstrap, ci_level, seed, stop
        )
        if contrast is POOLED:
            # same values as risk_diff_table's (the same integer sums), checked, not assumed
            assert np.array_equal(cols["risk_diff"], df["risk_diff"].to_numpy())
            null = c_null
        for name, values in cols.items():
            df[name] = values
        info: dict[str, Any] = {
            "case": [list(g) for g in contrast.case],
            "reference": [list(g) for g in contrast.reference],
            **sizes,
        }
        if c_null.size:
            info["null_threshold"] = float(np.quantile(c_null, null_quantile))
        contrasts[contrast.name] = info

    meta: dict[str, str] = {
        k: str(v) for k, v in counts.routing_meta.items() if not k.startswith(PER_SHARD_PREFIX)
    }
    meta.update(
        {
            "token_scope": token_scope,
            "n_prompts_safe": str(int((~counts.unsafe).sum())),
            "n_prompts_unsafe": str(int(counts.unsafe.sum())),
            "n_tokens_safe": str(int(df["n_safe"].iloc[0])),
            "n_tokens_unsafe": str(int(df["n_unsafe"].iloc[0])),
            "n_permutations": str(n_permutations),
            "n_bootstrap": str(n_bootstrap),
            "ci_level": repr(float(ci_level)),
            "seed": str(seed),
            "null_quantile": repr(float(null_quantile)),
            "contrasts": json.dumps(contrasts),
        }
    )
    if stop is not None:
        meta.update({"p_method": p_method, "p_max_permutations": str(p_max_permutations),
                     "p_stop_exceedances": str(p_stop_exceedances)})
    quantiles = null_quantiles(null, null_quantile)
    if null.size:
        threshold = float(np.quantile(null, null_quantile))
        meta["null_threshold"] = repr(threshold)
        meta["n_beyond_null"] = str(int((df["risk_diff"].abs() > threshold).sum()))
    meta["null_quantiles"] = json.dumps(quantiles)
    return df, meta
