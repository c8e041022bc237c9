"""The summarize stage (reports/summary.json): the committed record is what the stage computes
from the committed reports, the dev rules' bounds are eval_safety's goals in params.yaml, and
the record round-trips its JSON exactly."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest

from steerline.core.params import Params, load_params
from steerline.pipeline.summarize import Inputs, dev_sweep, read_sweep, summarize
from steerline.pipeline.summary_records import read_summary

ROOT = Path(__file__).resolve().parents[1]
INPUTS = Inputs(
    sweep=ROOT / "reports/safety_dev_sweep.csv",
    experts_summary=ROOT / "reports/experts_summary.json",
    risk_diff_summary=ROOT / "reports/risk_diff_summary.json",
    risk_diff_finetuned_summary=ROOT / "reports/risk_diff_finetuned_summary.json",
    train_metrics=ROOT / "reports/train_steering/metrics.json",
    mat_metrics=ROOT / "reports/mat_steer_eval.json",
    mat_details=ROOT / "reports/mat_steer_eval_details.json",
    mat_items=ROOT / "reports/mat_steer_eval_items.parquet",
)


@pytest.fixture(scope="module")
def params() -> Params:
    with contextlib.chdir(ROOT):  # data paths are checked against the working directory
        return load_params()


def with_over_refusal_max(params: Params, variant: str, value: float) -> Params:
    goals = dict(params.eval_safety.goals)
    goals[variant] = goals[variant].model_copy(update={"max_over_refusal_rise": value})
    return params.model_copy(update={
        "eval_safety": params.eval_safety.model_copy(update={"goals": goals})})


def test_the_committed_summary_is_what_the_stage_computes(params):
    got = summarize(params, INPUTS).model_dump(mode="json")
    assert got == json.loads((ROOT / "reports/summary.json").read_text()), (
        "reports/summary.json is stale: run the summarize stage (dvc repro summarize)")


def test_the_record_round_trips_its_json(params, tmp_path):
    summary = summarize(params, INPUTS)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary.model_dump(mode="json")))
    assert read_summary(path) == summary


def test_the_over_refusal_bounds_are_eval_safetys_goals(params):
    df, n = read_sweep(INPUTS.sweep), 9
    now = dev_sweep(df, n, params, INPUTS.sweep)
    assert now.activate_pick == "ft8e-4 + activate n4 d1.0"  # +4 points; n8 / n16 over-refuse
    wider = dev_sweep(df, n, with_over_refusal_max(params, "finetuned_activate", 20.0),
                      INPUTS.sweep)
    assert wider.activate_over_refusal_max == 20.0
    assert wider.activate_pick == "ft8e-4 + activate n16 d1.0"  # +18 points now within
    assert (wider.finetune_pick, wider.deactivate_pick, wider.base_steering_pick) == \
        (now.finetune_pick, now.deactivate_pick, now.base_steering_pick)


def test_a_sweep_without_runs_of_the_current_expert_list_is_an_error(params):
    """The current list's runs are named by its size: a new selection without a new sweep
    must not document the old list's runs as the current choice."""
    with pytest.raises(ValueError, match=r"no fine-tuning run 'finetuned\(12\) \.\.\.'"):
        dev_sweep(read_sweep(INPUTS.sweep), 12, params, INPUTS.sweep)


def test_a_missing_sweep_column_is_an_error(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text(INPUTS.sweep.read_text().replace("refusal_unsafe_points_vs_ref", "p", 1))
    with pytest.raises(ValueError, match="no column 'refusal_unsafe_points_vs_ref'"):
        read_sweep(path)


def test_runs_of_an_earlier_expert_list_are_history_with_the_same_rules_picks(params):
    df = read_sweep(INPUTS.sweep)
    old = df[df["run"].str.startswith(("finetuned(9) ", "ft8e-4 "))].copy()
    old["run"] = old["run"].str.replace("(9)", "(5)", regex=False).str.replace("ft8e-4", "old")
    old["reference"] = old["reference"].str.replace("(9)", "(5)", regex=False)
    now = dev_sweep(df, 9, params, INPUTS.sweep)
    got = dev_sweep(pd.concat([df, old], ignore_index=True), 9, params, INPUTS.sweep)
    assert got.model_copy(update={"history": [], "history_picks": []}) == now
    assert got.history == list(old["run"])
    assert got.history_picks == ["finetuned(5) lr8e-4", "old + deactivate n16 d0.01",
                                 "old + activate n4 d1.0"]
