"""Stage risk_diff: data/routing + data/prompts/safety.parquet (each prompt's source, for the
contrasts) -> reports/risk_diff.parquet, heatmap, plot data, summary.

Everything is computed (and the PNG rendered in memory) before the first write, so a failure
leaves the previous outputs untouched; each write is atomic. `--routing` and `--out-prefix`
point it at another capture (stage risk_diff_finetuned: data/routing_finetuned ->
reports/risk_diff_finetuned*); the defaults are the paths below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from steerline.core.io import atomic_path, write_json, write_parquet
from steerline.core.params import load_params
from steerline.steermoe.detection.risk_diff import (
    compute_risk_diff,
    heatmap_png,
    plot_rows,
    risk_diff_summary,
)

ROUTING = Path("data/routing")
PROMPTS = Path("data/prompts/safety.parquet")
REPORT = Path("reports/risk_diff.parquet")
HEATMAP = Path("reports/risk_diff_heatmap.png")
PLOT_DATA = Path("reports/risk_diff_top.csv")
SUMMARY = Path("reports/risk_diff_summary.json")

log = logging.getLogger("risk_diff")


def main(argv: Sequence[str] = ()) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--routing", type=Path, default=ROUTING, help="routing shards folder")
    ap.add_argument(
        "--out-prefix",
        default="reports/risk_diff",
        help="outputs: PREFIX.parquet, PREFIX_heatmap.png, PREFIX_top.csv, PREFIX_summary.json",
    )
    args = ap.parse_args(list(argv))
    report, heatmap, plot_data, summary_path = (
        Path(f"{args.out_prefix}{tail}")
        for tail in (".parquet", "_heatmap.png", "_top.csv", "_summary.json")
    )
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    p = params.risk_diff
    if not PROMPTS.is_file():
        raise ValueError(
            f"{PROMPTS} not found: run prepare_safety first (dvc repro prepare_safety)"
        )
    prompts = pd.read_parquet(PROMPTS, columns=["prompt_id", "label", "source"])
    df, meta = compute_risk_diff(
        args.routing,
        token_scope=p.token_scope,
        n_permutations=p.n_permutations,
        null_quantile=p.null_quantile,
        seed=params.seed,
        progress=True,
        prompts=prompts,
        n_bootstrap=p.n_bootstrap,
        ci_level=p.ci_level,
    )
    summary = risk_diff_summary(df, meta)
    png = heatmap_png(df, meta)
    plot_csv = plot_rows(df).to_csv(index=False, float_format="%.6g")

    write_parquet(df, report, metadata=meta)
    with atomic_path(heatmap) as tmp:
        tmp.write_bytes(png)
    with atomic_path(plot_data) as tmp:
        tmp.write_text(plot_csv)
    write_json(summary, summary_path)
    sig = summary["significant"]
    log.info(
        "scope %s: %s safe / %s unsafe tokens, max |risk_diff| %.4f; pairs with q <= %g: pooled "
        "%d prompt-level / %d token-level, matched %d / %d; %s beyond the null's q%s; "
        "agreement %s",
        meta["token_scope"],
        meta["n_tokens_safe"],
        meta["n_tokens_unsafe"],
        summary["max_abs_risk_diff"],
        summary["alpha"],
        sig["pooled"]["q_perm"],
        sig["pooled"]["q_token_z"],
        sig["matched"]["q_perm"],
        sig["matched"]["q_token_z"],
        meta.get("n_beyond_null", "n/a"),
        meta["null_quantile"],
        summary["agreement"],
    )


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(lambda: main(sys.argv[1:]))
