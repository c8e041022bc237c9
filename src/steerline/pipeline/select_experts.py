"""Stage select_experts: the risk-difference table -> the selected experts (experts.json) and a
summary. One stage definition serves the base and the fine-tuned model (dvc.yaml's foreach)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from steerline.core.io import parquet_metadata, staged_outputs, write_json
from steerline.core.params import Params
from steerline.steermoe.detection.select_experts import experts_summary, select_experts

log = logging.getLogger("select_experts")


@dataclass(frozen=True)
class Inputs:
    report: Path  # risk_diff.parquet


@dataclass(frozen=True)
class Outputs:
    experts: Path  # experts.json: {"unsafe": [[layer, expert], ...], "safe": [...], "criteria"}
    summary: Path  # JSON metrics


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.select_experts
    if not inputs.report.is_file():
        raise ValueError(
            f"{inputs.report} not found: run the risk_diff stage first (dvc repro risk_diff)"
        )
    df = pd.read_parquet(inputs.report)
    meta = parquet_metadata(inputs.report)
    # the select_experts section's keys are select_experts' keywords (as `steerline detect`)
    selection = select_experts(df, **p.model_dump(), meta=meta)
    summary = experts_summary(df, selection, meta)

    with staged_outputs() as staged:  # both files or neither (a full disk leaves the old pair)
        write_json(selection, staged(out.experts))
        write_json(summary, staged(out.summary))
    log.info("%d unsafe and %d safe experts selected", summary["n_unsafe"], summary["n_safe"])
