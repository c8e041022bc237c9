"""The CI report, DVC's convention (what CML's `cml comment create` posts): reports/report.md
with, first, what changed against a base commit item by item with a paired test per headline
metric (report/paired.py), then `dvc metrics diff --md` against it, the selected experts (top N
each way with risk_diff, CI and q), the safety and MAT-Steer tables with their confidence
intervals, and every `dvc plots` plot as a PNG beside it (reports/report_plots/). Built from
local files only.

    python -m steerline.report [--base main] [--out reports/report.md]   (`make report`)

Inputs are read as they are: a missing file or column shows as "n/a" with the stage that writes
it, never an error (the report is also built after a partial run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerline.core.io import atomic_path
from steerline.core.tables import md_table
from steerline.report import paired
from steerline.report.experts import experts_section
from steerline.report.json_tables import json_tables
from steerline.report.metrics_diff import base_ref, metrics_diff
from steerline.report.plots import plots_section


def _params(root: Path) -> dict[str, Any]:
    """params.yaml as a dict ({} when missing or unreadable: the report never fails on it)."""
    import yaml

    from steerline.core.params import load_yaml

    try:
        return load_yaml(root / "params.yaml") or {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: aliases past the size limit
        return {}


def build(root: Path, out: Path, base: str | None, top: int) -> str:
    ref = base_ref(root, base)
    plots_dir = out.with_name(out.stem + "_plots")
    sections = [
        "# steerline report",
        f"## What changed vs {ref} (paired, the same test items)\n\n"
        + paired.section(root, ref, md_table, _params(root)),
        f"## Metrics: `dvc metrics diff {ref} --md`\n\n" + metrics_diff(ref, root),
        "## Selected experts (reports/risk_diff.parquet)\n\n" + experts_section(root, top),
        "## Safety evaluation (reports/safety_eval.json)\n\n"
        + json_tables(root / "reports/safety_eval.json", "eval_safety"),
        "## MAT-Steer evaluation (reports/mat_steer_eval.json)\n\n"
        + json_tables(root / "reports/mat_steer_eval.json", "eval_steering"),
        "## Plots (`dvc plots show`)\n\n" + plots_section(root, plots_dir, plots_dir.name),
    ]
    text = "\n\n".join(s.rstrip() for s in sections) + "\n"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m steerline.report", description=__doc__)
    ap.add_argument("--base", help="commit to diff the metrics against (default: main, else "
                                   "HEAD)")
    ap.add_argument("--out", default="reports/report.md")
    ap.add_argument("--top", type=int, default=10, help="experts per side (default 10)")
    ap.add_argument("--root", default=".", help="the project checkout (default: .)")
    args = ap.parse_args(argv)
    if args.top < 1:
        sys.exit(f"report: --top must be >= 1, got {args.top}")
    root = Path(args.root)
    if not (root / "dvc.yaml").is_file():
        sys.exit(f"report: {root / 'dvc.yaml'} not found: run from the project root or pass "
                 "--root")
    out = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    text = build(root, out, args.base, args.top)
    print(f"wrote {out} ({len(text.splitlines())} lines) and {out.stem}_plots/")
