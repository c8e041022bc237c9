"""`steerline experts`: the experts whose routing differs most between unsafe and safe prompts,
from reports/risk_diff.parquet (the risk_diff stage), with CIs and q-values."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name, help="top experts by risk difference (reports/risk_diff.parquet)",
        description="The N highest (unsafe) and N lowest (safe) risk differences "
                    "P(expert | unsafe) - P(expert | safe) with their prompt-level CI and q-value.")
    p.add_argument("--top", type=int, default=10, metavar="N", help="pairs per side (default 10)")
    p.add_argument("--contrast", default="pooled",
                   help="which contrast of the report (default: pooled; others as the report "
                        "has them, e.g. matched)")
    p.add_argument("--risk-diff", default="reports/risk_diff.parquet", metavar="PARQUET")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")


def run(args: argparse.Namespace) -> None:
    from steerline.steermoe.detection.expert_table import (
        read_risk_diff,
        render,
        table_rows,
        top_experts,
    )

    table = top_experts(read_risk_diff(args.risk_diff), args.top, args.contrast)
    header, rows = table_rows(table)
    print(f"{args.risk_diff}, contrast {args.contrast}: top {args.top} per side")
    print(render(header, rows, args.markdown))
