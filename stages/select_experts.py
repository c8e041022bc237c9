"""Stage select_experts: reports/risk_diff.parquet -> models/experts.json + summary metrics.

The options point it at another report (stage select_experts_finetuned:
reports/risk_diff_finetuned.parquet -> models/experts_finetuned.json); defaults: the paths below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from steerline.core.io import parquet_metadata, write_json
from steerline.core.params import load_params
from steerline.steermoe.detection.select_experts import experts_summary, select_experts

REPORT = Path("reports/risk_diff.parquet")
EXPERTS = Path("models/experts.json")
SUMMARY = Path("reports/experts_summary.json")

log = logging.getLogger("select_experts")


def main(argv: Sequence[str] = ()) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--report", type=Path, default=REPORT, help="risk_diff report (Parquet)")
    ap.add_argument("--experts", type=Path, default=EXPERTS, help="selection (JSON) to write")
    ap.add_argument("--summary", type=Path, default=SUMMARY, help="summary metrics to write")
    args = ap.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = load_params().select_experts
    if not args.report.is_file():
        raise ValueError(
            f"{args.report} not found: run the risk_diff stage first (dvc repro risk_diff)"
        )
    df = pd.read_parquet(args.report)
    meta = parquet_metadata(args.report)
    selection = select_experts(
        df, threshold=p.threshold, top_k=p.top_k, alpha=p.alpha, require=p.require, meta=meta
    )
    summary = experts_summary(df, selection, meta)

    write_json(selection, args.experts)
    write_json(summary, args.summary)
    log.info("%d unsafe and %d safe experts selected", summary["n_unsafe"], summary["n_safe"])


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(lambda: main(sys.argv[1:]))
