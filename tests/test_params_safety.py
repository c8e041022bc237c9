"""Params schema and safety-prompt preparation: unknown keys, bad values, splits, bad data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from steerline.params import ParamsError, load_params, parse_params
from steerline.steermoe.safety_data import build_safety_prompts, validate_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.select_experts.threshold == 0.05 and p.select_experts.top_k == 50


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"risk_diff": {"tokn_scope": "user"}}, "risk_diff.tokn_scope"),
        ({"capture_routing": {"max_new_tokens": 8, "beam": 2}}, "capture_routing.beam"),
        ({"lambda_sprase": 0.5}, "lambda_sprase"),
    ],
)
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ParamsError, match=f"unknown params key '{key}'"):
        parse_params(raw)


def test_bad_value_is_named():
    with pytest.raises(ParamsError, match="risk_diff.token_scope"):
        parse_params({"risk_diff": {"token_scope": "everything"}})


def test_params_file_round_trip(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["select_experts"]["thresold"] = 0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="select_experts.thresold"):
        load_params(tmp_path / "params.yaml")


def test_safety_split_is_stratified_and_seeded():
    raw = ROOT / "data/raw"
    args = (raw / "advbench/harmful_behaviors.csv", raw / "xstest/xstest_prompts.csv", 0.5, 250)
    a, b = build_safety_prompts(*args, seed=0), build_safety_prompts(*args, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert build_safety_prompts(*args, seed=1)["split"].tolist() != a["split"].tolist()
    counts = a.groupby(["source", "label", "split"]).size().unstack()
    assert ((counts["detect"] - counts["test"]).abs() <= 1).all()
    assert set(a["label"]) == {"safe", "unsafe"} and a["prompt_id"].is_unique


@pytest.mark.parametrize(
    "frame, match",
    [
        (pd.DataFrame({"prompt_id": ["a", "b"], "text": ["x", " "], "label": ["safe", "unsafe"]}),
         "empty text"),
        (pd.DataFrame({"prompt_id": ["a", "a"], "text": ["x", "y"], "label": ["safe", "unsafe"]}),
         "duplicate prompt_id"),
    ],
)
def test_bad_prompt_rows(frame, match):
    with pytest.raises(ValueError, match=match):
        validate_prompts(frame, "t")
