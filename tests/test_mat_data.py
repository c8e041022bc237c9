"""MAT-Steer attribute tables: grouped, seeded splits without leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steerline.core.params import load_params
from steerline.core.splits import groups_across_splits
from steerline.mat_steer.checks import check_splits
from steerline.mat_steer.datasets import (
    build_bbq,
    build_toxigen,
    build_truthfulqa,
    split_prompt_line,
)
from steerline.mat_steer.splits import SPLITS, holdout_fractions, row_balanced_split, task_rng
from steerline.pipeline.prepare_attributes import Inputs, prepare_attributes

ROOT = Path(__file__).resolve().parents[1]
REPO = load_params(ROOT / "params.yaml")
REPO_PARAMS = REPO.prepare_attributes
RAW = ROOT / "data" / "raw"


RAW_INPUTS = Inputs(truthfulqa=RAW / "truthfulqa" / "mc_task.json", toxigen=RAW / "toxigen",
                    bbq=RAW / "bbq")


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return prepare_attributes(RAW_INPUTS, REPO_PARAMS, 0, REPO.attributes)


def test_row_balanced_split_keeps_groups_and_fractions() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"g{i}" for i in range(400)], rng.integers(1, 6, 400))
    splits = row_balanced_split(groups, {"train": 0.4, "dev": 0.1, "test": 0.5},
                           np.random.default_rng(1))
    df = pd.DataFrame({"g": groups, "s": splits})
    assert (df.groupby("g")["s"].nunique() == 1).all()
    share = df["s"].value_counts(normalize=True)
    assert abs(share["train"] - 0.4) < 0.02 and abs(share["test"] - 0.5) < 0.02
    again = row_balanced_split(groups, {"train": 0.4, "dev": 0.1, "test": 0.5},
                          np.random.default_rng(1))
    assert (again == splits).all()
    with pytest.raises(ValueError, match="sum to 1"):
        row_balanced_split(groups, {"train": 0.5, "test": 0.4}, np.random.default_rng(0))


def test_groups_across_splits_names_each_leak_once_sorted() -> None:
    groups = pd.Series(["b", "a", "b", "c", "a", None])
    splits = pd.Series(["train", "dev", "test", "dev", "dev", "test"])
    assert list(groups_across_splits(groups, splits)) == ["b"]  # a null group is no leak


def test_no_group_item_or_text_crosses_splits(tables: dict[str, pd.DataFrame]) -> None:
    for task, df in tables.items():
        check_splits(df)  # raises on leakage
        assert (df.groupby("group_id")["split"].nunique() == 1).all(), task
        assert set(df["split"]) == set(SPLITS), task
        for split in SPLITS:
            assert set(df.loc[df["split"] == split, "label"]) == {"pos", "neg"}, (task, split)


def test_prepare_is_deterministic(tables: dict[str, pd.DataFrame]) -> None:
    again = prepare_attributes(RAW_INPUTS, REPO_PARAMS, 0, REPO.attributes)
    other = prepare_attributes(RAW_INPUTS, REPO_PARAMS, 1, REPO.attributes)
    for task in tables:
        pd.testing.assert_frame_equal(tables[task], again[task])
    assert not tables["truthfulqa"]["split"].equals(other["truthfulqa"]["split"])


def test_truthfulqa_split_by_question_40_10_50() -> None:
    mc = json.loads((RAW / "truthfulqa" / "mc_task.json").read_text())
    df = build_truthfulqa(mc, task_rng(0, "truthfulqa"), {"train": 0.4, "dev": 0.1, "test": 0.5})
    per_q = df.drop_duplicates("item_id")["split"].value_counts(normalize=True)
    assert abs(per_q["train"] - 0.4) < 0.01 and abs(per_q["dev"] - 0.1) < 0.01
    row = df.iloc[0]
    assert row["text"] == row["prompt"] + " " + row["text"][len(row["prompt"]) + 1:]
    assert row["choices"][row["correct_idx"]] in set(df.loc[(df["item_id"] == row["item_id"])
                                                             & (df["label"] == "pos"), "text"]
                                                      .str[len(row["prompt"]) + 1:])
    assert len(row["mc2_choices"]) == len(row["mc2_labels"]) > len(row["choices"]) - 1


def test_bbq_groups_are_templates_and_neg_is_wrong() -> None:
    recs = [json.loads(line) for line in (RAW / "bbq" / "Age.jsonl").read_text().splitlines()]
    df = build_bbq(recs, np.random.default_rng(0), holdout_fractions(0.1, 0.2))
    assert df["group_id"].nunique() == 25  # question_index templates
    for item, rows in df.groupby("item_id"):
        pos = rows[rows["label"] == "pos"].iloc[0]
        neg = rows[rows["label"] == "neg"].iloc[0]
        assert pos["text"].endswith(pos["choices"][pos["correct_idx"]]), item
        assert not neg["text"].endswith(" " + pos["choices"][pos["correct_idx"]]), item


def test_toxigen_statements_dedup_and_labels() -> None:
    line = "- a b c\\n- d e f\\n-"
    assert split_prompt_line(line) == ["a b c", "d e f"]
    files = {"prompts/hate_x_1k.txt": "- Bad thing one\\n- bad  thing ONE!\\n- bad two\\n-\n",
             "prompts/neutral_x_1k.txt": "- good one\\n- good two\\n-\n- good two\\n-\n",
             "demonstrations/x/neutral_x.txt": "good three\n"}
    df = build_toxigen(files, np.random.default_rng(0),
                       {"train": 0.6, "dev": 0.2, "test": 0.2})
    assert len(df) == 5  # "Bad thing one" == "bad  thing ONE!" after normalization
    assert set(df.loc[df["label"] == "neg", "correct_idx"]) == {1}
    assert set(df.loc[df["label"] == "pos", "correct_idx"]) == {0}
    assert all(c == ["No", "Yes"] for c in df["choices"])
