"""Stage risk_diff: data/routing -> reports/risk_diff.parquet, heatmap, plot data, summary.

Everything is computed (and the PNG rendered in memory) before the first write, so a failure
leaves the previous outputs untouched; each write is atomic.
"""

from __future__ import annotations

import logging
from pathlib import Path

from steerline.io import atomic_path, write_json, write_parquet
from steerline.params import load_params
from steerline.steermoe.risk_diff import (
    compute_risk_diff,
    heatmap_png,
    plot_rows,
    risk_diff_summary,
)

ROUTING = Path("data/routing")
REPORT = Path("reports/risk_diff.parquet")
HEATMAP = Path("reports/risk_diff_heatmap.png")
PLOT_DATA = Path("reports/risk_diff_top.csv")
SUMMARY = Path("reports/risk_diff_summary.json")

log = logging.getLogger("risk_diff")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    p = params.risk_diff
    df, meta = compute_risk_diff(
        ROUTING,
        token_scope=p.token_scope,
        n_permutations=p.n_permutations,
        null_quantile=p.null_quantile,
        seed=params.seed,
        progress=True,
    )
    summary = risk_diff_summary(df, meta)
    png = heatmap_png(df, meta)
    plot_csv = plot_rows(df).to_csv(index=False, float_format="%.6g")

    write_parquet(df, REPORT, metadata=meta)
    with atomic_path(HEATMAP) as tmp:
        tmp.write_bytes(png)
    with atomic_path(PLOT_DATA) as tmp:
        tmp.write_text(plot_csv)
    write_json(summary, SUMMARY)
    log.info(
        "scope %s: %s safe / %s unsafe tokens, max |risk_diff| %.4f, %d pairs with q <= 0.05, "
        "%s beyond the null's q%s",
        meta["token_scope"],
        meta["n_tokens_safe"],
        meta["n_tokens_unsafe"],
        summary["max_abs_risk_diff"],
        summary["n_q_le_alpha"],
        meta.get("n_beyond_null", "n/a"),
        meta["null_quantile"],
    )


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad input or params: one clear line, no traceback noise
        raise SystemExit(f"risk_diff: {err}") from None
