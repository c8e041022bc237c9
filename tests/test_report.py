"""steerline.report: the CI report on a tiny workspace (exact tables, n/a for what is missing,
plots written as PNGs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steerline.core.tables import fmt, md_table
from steerline.report.build import build
from steerline.report.json_tables import cell, json_tables, metric_rows
from steerline.steermoe.detection.expert_table import (
    read_risk_diff,
    render,
    table_rows,
    top_experts,
)

ROOT = Path(__file__).resolve().parents[1]

DVC_YAML = """stages:
  s:
    cmd: 'true'
    metrics:
      - reports/safety_eval.json:
          cache: false
    plots:
      - reports/curve.tsv:
          cache: false
          x: step
      - reports/heat.png:
          cache: false
"""


def workspace(root: Path) -> None:
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc/config").write_text("[core]\n    no_scm = true\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "reports").mkdir()
    (root / "models").mkdir()
    pd.DataFrame({"step": [0, 1, 2], "loss": [1.0, 0.5, 0.25]}).to_csv(
        root / "reports/curve.tsv", sep="\t", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(root / "reports/heat.png", [[0.0, 1.0], [1.0, 0.0]])
    pd.DataFrame({"layer": [0, 0, 1, 1], "expert": [0, 1, 0, 1],
                  "risk_diff": [0.3, -0.2, 0.1, -0.05], "q_value": [0.01, 0.02, 0.3, 0.5]}
                 ).to_parquet(root / "reports/risk_diff.parquet")
    (root / "models/experts.json").write_text('{"unsafe": [[0, 0]], "safe": []}')
    (root / "reports/safety_eval.json").write_text(json.dumps({
        "base": {"refusal_unsafe": 0.0125, "refusal_unsafe_ci_low": 0.002,
                 "refusal_unsafe_ci_high": 0.0675, "ppl_benign": 2.9},
        "steered": {"refusal_unsafe": 0.05, "ppl_benign": 3.1}}))


def test_cells_join_value_and_interval():
    assert cell({"rate": 0.5, "ci_low": 0.25, "ci_high": 0.75, "p_value": 0.01}) == \
        "0.500 [0.250, 0.750] (p_value 0.010)"
    assert cell({"diff": -0.1, "lo": -0.2, "hi": 0.0}) == "-0.100 [-0.200, 0.000]"
    assert cell(float("nan")) == "n/a" and cell(None) == "n/a" and cell(3) == "3"
    header, rows = metric_rows({"a": {"m": 0.5, "m_ci_low": 0.4, "m_ci_high": 0.6, "k": 2},
                                "b": {"k": 3}})
    assert header == ["", "m", "k"]
    assert rows == [["a", "0.500 [0.400, 0.600]", "2"], ["b", "n/a", "3"]]


def test_json_tables_nested_and_missing(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"base": {"acc": 0.5}, "gates": {"t": {"auroc": 0.7}}, "n": 4}))
    text = json_tables(path, "eval_steering")
    assert "| base | 0.500 |" in text and "**gates**" in text and "| t | 0.700 |" in text
    assert "| n | 4 |" in text
    assert json_tables(tmp_path / "none.json", "eval_safety") == \
        f"n/a: {tmp_path / 'none.json'} not found (run the eval_safety stage)\n"


def test_report_on_a_tiny_workspace(tmp_path):
    workspace(tmp_path)
    text = build(tmp_path, tmp_path / "reports/report.md", "HEAD", 2)
    assert text == (tmp_path / "reports/report.md").read_text()
    sections = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert [s.split(" (")[0].split(":")[0] for s in sections] == [
        "## What changed vs HEAD", "## Metrics", "## Selected experts", "## Safety evaluation",
        "## MAT-Steer evaluation", "## Plots"]
    assert "n/a: `dvc metrics diff HEAD --md` failed" in text  # no git in the workspace
    assert "n/a: params.yaml lacks eval_steering.n_bootstrap or seed" in text
    lines = text.splitlines()
    assert "**selected by select_experts** (1 unsafe, 0 safe; first 2 of each list)" in lines
    assert "| unsafe | 1 | 0 | 0 | 0.300 | n/a | 0.010 |" in lines  # the selected table
    assert "| unsafe | 1 | 0 | 0 | 0.300 | n/a | 0.010 | yes |" in lines
    assert "| unsafe | 2 | 1 | 0 | 0.100 | n/a | 0.300 |  |" in text
    assert "| safe | 1 | 0 | 1 | -0.200 | n/a | 0.020 |  |" in text
    assert "| base | 0.013 [0.002, 0.068] | 2.900 |" in text
    assert "| steered | 0.050 | 3.100 |" in text
    assert "n/a: " + str(tmp_path / "reports/mat_steer_eval.json") + " not found" in text
    plots = sorted(p.name for p in (tmp_path / "reports/report_plots").iterdir())
    assert plots == ["reports_curve_tsv.png", "reports_heat_png.png"]
    assert "![reports/curve.tsv](report_plots/reports_curve_tsv.png)" in text
    out = tmp_path / "reports/report_plots"
    heat = (tmp_path / "reports/heat.png").read_bytes()
    assert (out / "reports_heat_png.png").read_bytes() == heat
    assert (out / "reports_curve_tsv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selected_table_with_prompt_level_columns(tmp_path):
    from steerline.report.experts import selected_table

    df = pd.DataFrame({"layer": [0, 1], "expert": [2, 3], "risk_diff": [0.2, -0.1],
                       "ci_low": [0.1, -0.2], "ci_high": [0.3, 0.0], "q_perm": [0.01, 0.5],
                       "q_token_z": [1e-9, 1e-3], "matched_risk_diff": [0.05, 0.02]})
    path = tmp_path / "experts.json"
    path.write_text('{"unsafe": [[0, 2], [5, 5]], "safe": [[1, 3]]}')
    lines = selected_table(df, path, 10).splitlines()
    assert lines[2] == ("| side | # | layer | expert | risk_diff | 95% CI | q (q_perm) "
                        "| matched risk_diff |")
    assert lines[4:] == ["| unsafe | 1 | 0 | 2 | 0.200 | [0.100, 0.300] | 0.010 | 0.050 |",
                         "| unsafe | 2 | 5 | 5 | n/a | n/a | n/a | n/a |",
                         "| safe | 1 | 1 | 3 | -0.100 | [-0.200, 0.000] | 0.500 | 0.020 |"]


# ------------------------------------------------- one renderer: the fmt / md_table twins merged
def _expert_table_fmt(x: float, digits: int = 3) -> str:
    """steermoe/detection/expert_table.fmt before the merge (commit bd6bd78)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def _expert_table_markdown(header, rows) -> str:
    """expert_table.render(markdown=True) before it called md_table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def test_fmt_is_expert_tables_on_every_value_its_callers_pass():
    """expert_table and `steerline detect` format float columns (and None): on random, tiny,
    signed and special floats the merged fmt writes the same strings (no pipeline output needed:
    `make test` runs before `dvc repro`)."""
    rng = np.random.default_rng(0)
    floats = list(rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 4, 2000))
    floats += [0.0, -0.0, 1e-3, -1e-3, 9.99e-4, 5e-4, 0.0005, 1e-300, math.nan, math.inf,
               -math.inf, *np.float64(rng.random(50))]
    for digits in (1, 2, 3, 4):
        assert [fmt(x, digits) for x in floats] == [_expert_table_fmt(x, digits) for x in floats]
    assert fmt(None) == _expert_table_fmt(None) == "n/a"


def test_expert_tables_markdown_is_md_table_on_the_committed_report():
    path = ROOT / "reports/risk_diff.parquet"
    if not path.exists():
        pytest.skip("run `dvc repro risk_diff` first")
    table = top_experts(read_risk_diff(path), 50, "pooled")
    header, rows = table_rows(table)
    assert render(header, rows, markdown=True) == _expert_table_markdown(header, rows)
    assert md_table(header, rows) == _expert_table_markdown(header, rows)
