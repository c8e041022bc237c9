"""Stage risk_diff: routing shards + the safety prompts (each prompt's source, for the contrasts)
-> the per-(layer, expert) risk-difference table, its heatmap, plot data and summary.

Everything is computed (and the PNG rendered in memory) before the first write, and the four
outputs are published together (core.io.staged_outputs: all temporaries written, then the
renames), so a failure, a full disk included, leaves the previous outputs untouched. One stage
definition serves the base and the fine-tuned model's routing (dvc.yaml's foreach).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from steerline.core.io import staged_outputs, write_json, write_parquet
from steerline.core.params import Params
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.detection.plots import heatmap_png, plot_rows
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.detection.table import risk_diff_summary

log = logging.getLogger("risk_diff")


@dataclass(frozen=True)
class Inputs:
    routing: Path  # routing shards folder
    prompts: Path  # safety.parquet (prompt_id, label, source)


@dataclass(frozen=True)
class Outputs:
    report: Path  # risk_diff.parquet, one row per (layer, expert)
    heatmap: Path  # PNG
    plot_data: Path  # top / bottom pairs, CSV for `dvc plots`
    summary: Path  # JSON metrics


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.risk_diff
    table = read_safety_prompts(inputs.prompts)  # split integrity checked on the whole table
    prompts = table[[c for c in ("prompt_id", "label", "source") if c in table.columns]]
    # the risk_diff section's keys are compute_risk_diff's keywords (as `steerline detect`)
    df, meta = compute_risk_diff(inputs.routing, **p.model_dump(), seed=params.seed,
                                 progress=True, prompts=prompts)
    summary = risk_diff_summary(df, meta)
    png = heatmap_png(df, meta)
    plot_csv = plot_rows(df).to_csv(index=False, float_format="%.6g")

    with staged_outputs() as staged:
        write_parquet(df, staged(out.report), metadata=meta)
        staged(out.heatmap).write_bytes(png)
        staged(out.plot_data).write_text(plot_csv)
        write_json(summary, staged(out.summary))
    sig = summary["significant"]
    # the target scope (paired chats) has the pooled contrast only: no matched counts to log
    matched = sig.get("matched", {"q_perm": "n/a", "q_token_z": "n/a"})
    log.info(
        "scope %s: %s safe / %s unsafe tokens, max |risk_diff| %.4f; pairs with q <= %g: pooled "
        "%d prompt-level / %d token-level, matched %s / %s; %s beyond the null's q%s; "
        "agreement %s",
        meta["token_scope"],
        meta["n_tokens_safe"],
        meta["n_tokens_unsafe"],
        summary["max_abs_risk_diff"],
        summary["alpha"],
        sig["pooled"]["q_perm"],
        sig["pooled"]["q_token_z"],
        matched["q_perm"],
        matched["q_token_z"],
        meta.get("n_beyond_null", "n/a"),
        meta["null_quantile"],
        summary["agreement"],
    )
