"""The report's first section: paired changes against the base commit, item by item."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from steerline.core.tables import md_table
from steerline.report.paired import (
    MAT_ITEMS,
    SAFETY_ANSWERS,
    mat_changes,
    safety_changes,
    section,
)

PARAMS = {"seed": 0, "eval_steering": {"n_bootstrap": 500}}


def mat_items(shift: float, seed: int = 0) -> pd.DataFrame:
    """Two conditions on 40 items of one metric; mat_steer's values moved by `shift`."""
    rng = np.random.default_rng(seed)
    base = rng.random(40)
    rows = [pd.DataFrame({"condition": c, "metric": "bbq_acc",
                          "item_id": [f"i{k}" for k in range(40)], "value": v})
            for c, v in (("base", base), ("mat_steer", np.clip(base + shift, 0, 1)))]
    return pd.concat(rows, ignore_index=True)


def answers(flip: int) -> pd.DataFrame:
    """30 unsafe + 30 safe prompts; the `steered` variant's first `flip` unsafe verdicts turned
    to refusals."""
    ids = [f"u{k}" for k in range(30)] + [f"s{k}" for k in range(30)]
    labels = ["unsafe"] * 30 + ["safe"] * 30
    out = []
    for variant in ("base", "steered"):
        refusal = np.zeros(60, bool)
        if variant == "steered":
            refusal[:flip] = True
        out.append(pd.DataFrame({"variant": variant, "prompt_id": ids, "label": labels,
                                 "refusal": refusal}))
    return pd.concat(out, ignore_index=True)


def test_mat_changes_marks_a_real_shift_and_skips_unchanged_conditions():
    rows, same = mat_changes(mat_items(0.3), mat_items(0.0), 500, 0)
    assert same == ["base"]
    assert [r[:2] for r in rows] == [["mat_steer", "bbq_acc"], ["mat_steer", "average"]]
    assert rows[0][-1] == "**yes**" and rows[0][4].startswith("+0.2")
    tiny, _ = mat_changes(mat_items(0.3), mat_items(0.3, seed=0).assign(
        value=lambda d: d["value"] - np.where(d["item_id"] == "i0", 0.01, 0.0)), 500, 0)
    assert tiny[0][-1] == "no"  # one item moved by 0.01: within noise


def test_safety_changes_mcnemar_on_the_same_prompts():
    rows, same = safety_changes(answers(12), answers(0))
    assert same == ["base"]
    row, safe = rows  # a changed variant shows both rates: over-refusal did not move
    assert safe[1:5] == ["over-refusal (safe)", "0.0%", "0.0%", "+0.0 points"]
    assert safe[5:] == ["1.0", "no"]
    assert row[:2] == ["steered", "refusal (unsafe)"]
    assert row[2:5] == ["0.0%", "40.0%", "+40.0 points"] and row[-1] == "**yes**"
    assert row[5] == "0.000488"  # 2 * 0.5 ** 12: 12 discordant pairs, all one way
    few, _ = safety_changes(answers(2), answers(0))
    assert few[0][-1] == "no"  # p = 0.5


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_section_compares_the_workspace_with_a_commit(tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "reports").mkdir()
    mat_items(0.0).to_parquet(tmp_path / MAT_ITEMS)
    answers(0).to_parquet(tmp_path / SAFETY_ANSWERS)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "base")
    mat_items(0.3).to_parquet(tmp_path / MAT_ITEMS)
    answers(12).to_parquet(tmp_path / SAFETY_ANSWERS)
    text = section(tmp_path, "main", md_table, PARAMS)
    assert "**MAT-Steer test items**: 2 of 2 changed metrics significant" in text
    assert "every item unchanged: base" in text
    assert "**safety test prompts**: 1 of 2 changed metrics significant (steered refusal" in text
    assert "| steered | refusal (unsafe) | 0.0% | 40.0% | +40.0 points |" in text
    # a base that does not exist, and a workspace without the files: said, never an error
    assert "not available" in section(tmp_path, "no-such-rev", md_table, PARAMS)
    (tmp_path / MAT_ITEMS).unlink()
    assert "not in the workspace" in section(tmp_path, "main", md_table, PARAMS)
    assert "lacks eval_steering.n_bootstrap" in section(tmp_path, "main", md_table, {})
