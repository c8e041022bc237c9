"""Stage select_experts: reports/risk_diff.parquet -> models/experts.json + summary metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from steerline.io import parquet_metadata, write_json
from steerline.params import load_params
from steerline.steermoe.select_experts import experts_summary, select_experts

REPORT = Path("reports/risk_diff.parquet")
EXPERTS = Path("models/experts.json")
SUMMARY = Path("reports/experts_summary.json")

log = logging.getLogger("select_experts")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = load_params().select_experts
    if not REPORT.is_file():
        raise ValueError(f"{REPORT} not found: run the risk_diff stage first (dvc repro risk_diff)")
    df = pd.read_parquet(REPORT)
    meta = parquet_metadata(REPORT)
    selection = select_experts(df, threshold=p.threshold, top_k=p.top_k, alpha=p.alpha, meta=meta)
    summary = experts_summary(df, selection, meta)

    write_json(selection, EXPERTS)
    write_json(summary, SUMMARY)
    log.info("%d unsafe and %d safe experts selected", summary["n_unsafe"], summary["n_safe"])


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"select_experts: {err}") from None
