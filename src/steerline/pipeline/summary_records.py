"""reports/summary.json's schema: the numbers the docs show that no other stage writes (the dev
sweep's picks, the style weight, MAT-Steer's goal margins, verdicts, changed items and scale
positions), written by the summarize stage and read back, validated, by tools/docs_results.py.

Typed so a reader gets the same record the stage wrote; floats round-trip JSON exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DevSweep(Record):
    """The dev rules applied to reports/safety_dev_sweep.csv: each group's runs in CSV order and
    each rule's pick (None: no run qualifies). The over-refusal bounds are eval_safety's goals'
    max_over_refusal_rise (params.yaml), the points a pick may over-refuse above its reference."""

    n_unsafe_experts: int  # select_experts@base's list; its fine-tuning runs are 'finetuned(N) ...'
    finetune_over_refusal_max: float  # eval_safety.goals.finetuned
    activate_over_refusal_max: float  # eval_safety.goals.finetuned_activate
    steered_over_refusal_max: float  # eval_safety.goals.steered
    finetune: list[str]  # fine-tuned on the current unsafe list, vs base, unsteered
    finetune_pick: str  # within its bound, then the highest refusal (first run on ties)
    finetuned_steering: list[str]  # the picked fine-tuned model steered by its own experts
    deactivate_pick: str | None  # the largest refusal drop
    activate_pick: str | None  # the largest refusal rise within its bound
    base_steering: list[str]  # models/moe steered, vs base
    base_steering_pick: str | None  # the largest refusal rise within its bound
    history: list[str]  # the rest: runs of an earlier expert list
    # the same rules on the history: its fine-tuning pick, then (when that model was steered)
    # its deactivate and activate picks
    history_picks: list[str | None]


class StyleWeight(Record):
    """pooled = w * style + matched, w = AdvBench tokens / all unsafe tokens (risk_diff)."""

    advbench_tokens: int
    unsafe_tokens: int
    w: float


class ChangedItems(Record):
    """Test items of one metric, and how many each condition scored differently from base."""

    test_items: int
    mat_steer: int
    mean_diff: int


class ScaleChoice(Record):
    chosen: float  # the scale eval_steering chose on dev
    position: Literal["largest", "smallest", "inside"]  # among the scales its sweep tried


class MatSteerSummary(Record):
    gate_goals: dict[str, float]  # steerline.mat_steer.report.GATE_GOALS
    # train_steering's dev diagnostics per attribute: the smallest margin to the goals without
    # the probe term (negative: a goal missed), and the smallest over attributes
    dev_margins: dict[str, float]
    smallest_dev_margin: float
    gate_failures: dict[str, list[str]]  # per attribute, the test goals missed (empty: met)
    changed_items: dict[str, ChangedItems]  # per metric, in eval_steering's items order
    scales: dict[str, ScaleChoice]  # per condition of eval_steering's dev sweeps


class Summary(Record):
    dev_sweep: DevSweep
    style_weight: dict[str, StyleWeight]  # "base", "finetuned": their risk_diff stage's counts
    mat_steer: MatSteerSummary


def read_summary(path: Path) -> Summary:
    """The record in `path` (pydantic.ValidationError when it does not fit the schema)."""
    return Summary.model_validate(json.loads(path.read_text()))
