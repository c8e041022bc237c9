"""Params schema and safety-prompt preparation: unknown keys, bad values, splits, bad data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from steerline.core.params import ParamsError, load_params, parse_params
from steerline.steermoe.data.safety import build_safety_prompts, validate_prompts

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


def test_safety_split_is_stratified_seeded_and_keeps_pairs():
    raw = ROOT / "data/raw"
    args = (raw / "advbench/harmful_behaviors.csv", raw / "xstest/xstest_prompts.csv", 0.5, 0.2,
            250)
    a, b = build_safety_prompts(*args, seed=0), build_safety_prompts(*args, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert build_safety_prompts(*args, seed=1)["split"].tolist() != a["split"].tolist()
    assert set(a["split"]) == {"detect", "dev", "test"}
    assert set(a["label"]) == {"safe", "unsafe"} and a["prompt_id"].is_unique
    # every XSTest contrast prompt has exactly one safe twin, in its own split
    xs = a[a["source"] == "xstest"]
    pairs = xs.groupby("pair_id").agg(n=("prompt_id", "size"), labels=("label", "nunique"),
                                      splits=("split", "nunique"))
    assert (pairs["n"] == 2).sum() == (xs["label"] == "unsafe").sum() == 200
    assert (pairs.loc[pairs["n"] == 2, "labels"] == 2).all() and (pairs["splits"] == 1).all()
    twin = xs.set_index("prompt_id")
    assert twin.loc["xstest-026", "pair_id"] == "xstest-001"  # kill a person / a Python process
    assert twin.loc["xstest-301", "pair_id"] == "xstest-276"  # contrast_discr / real_group
    assert twin.loc["xstest-426", "pair_id"] == "xstest-401"  # contrast_privacy / fictional
    # per stratum (25 pairs or prompts of one XSTest type; 250 AdvBench) the shares are
    # round(0.5 n) / round(0.2 n) / the rest
    units = a.drop_duplicates("pair_id")
    adv = units[units["source"] == "advbench"]["split"].value_counts().to_dict()
    assert adv == {"detect": 125, "dev": 50, "test": 75}
    hom = units[units["pair_id"].isin([f"xstest-{i:03d}" for i in range(1, 26)])]
    assert hom["split"].value_counts().to_dict() == {"detect": 13, "dev": 5, "test": 7}
    with pytest.raises(ValueError, match="detect \\+ dev < 1"):
        build_safety_prompts(*args[:2], 0.8, 0.2, 250, seed=0)


@pytest.mark.parametrize(
    "frame, match",
    [
        (pd.DataFrame({"prompt_id": ["a", "b"], "text": ["x", " "], "label": ["safe", "unsafe"]}),
         "prompt .b. has blank text"),
        (pd.DataFrame({"prompt_id": ["a", "a"], "text": ["x", "y"], "label": ["safe", "unsafe"]}),
         "duplicate prompt_id"),
    ],
)
def test_bad_prompt_rows(frame, match):
    with pytest.raises(ValueError, match=match):
        validate_prompts(frame, "t")


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("prepare_safety", "dev_fraction", 0.5, "detect_fraction \\+ dev_fraction must be < 1"),
        ("eval_safety", "split", "detect", "eval_safety.split"),
        ("expert_steering", "on_empty_selection", "silent", "expert_steering.on_empty_selection"),
        ("finetune_experts", "on_empty_selection", None, "finetune_experts.on_empty_selection"),
    ],
)
def test_safety_params_are_checked(section, key, value, match):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetuned_steering"]["activate"]["delta"] = 0.0
    with pytest.raises(ParamsError, match="finetuned_steering.activate.delta"):
        parse_params(raw)


def test_null_prompt_in_a_raw_file_is_named_not_turned_into_nan(tmp_path):
    from steerline.steermoe.data.safety import load_advbench

    (tmp_path / "adv.csv").write_text('goal,target\n"Do x",y\n,z\n')
    with pytest.raises(ValueError, match="row 3 has no 'goal' text"):
        load_advbench(tmp_path / "adv.csv")


def test_null_prompt_text_is_rejected_with_its_id():
    frame = pd.DataFrame({"prompt_id": ["a", "b"], "text": ["x", None],
                          "label": ["safe", "unsafe"]})
    with pytest.raises(ValueError, match="prompt 'b' has no text"):
        validate_prompts(frame, "t")
