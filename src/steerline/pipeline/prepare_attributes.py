"""Stage prepare_attributes: raw TruthfulQA, ToxiGen and BBQ -> one attribute table per task.

One row per text (see steerline.mat_steer.data for the columns, formats and grouping); splits are
grouped, seeded and checked for leakage before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from steerline.core.io import write_parquet
from steerline.core.params import Params, PrepareAttributes
from steerline.mat_steer.data import (
    BBQ_CATEGORIES,
    SPLITS,
    build_bbq,
    build_toxigen,
    build_truthfulqa,
    cap_items,
    check_splits,
    holdout_fractions,
    read_bbq_dir,
    read_toxigen_dir,
    task_rng,
)

log = logging.getLogger("prepare_attributes")


@dataclass(frozen=True)
class Inputs:
    truthfulqa: Path  # mc_task.json
    toxigen: Path  # folder of ToxiGen files
    bbq: Path  # folder of BBQ category files


@dataclass(frozen=True)
class Outputs:
    attributes: Path  # folder: {task}.parquet


def prepare_attributes(inputs: Inputs, p: PrepareAttributes, seed: int
                       ) -> dict[str, pd.DataFrame]:
    """Pure: the three attribute tables from the raw files."""
    if set(p.truthfulqa_fractions) != set(SPLITS):
        raise ValueError(f"prepare_attributes.truthfulqa_fractions needs keys {SPLITS}")
    mc = json.loads(inputs.truthfulqa.read_text())
    tables = {
        "truthfulqa": build_truthfulqa(mc, task_rng(seed, "truthfulqa"), p.truthfulqa_fractions,
                                       p.truthfulqa_answers_per_label),
        "toxigen": build_toxigen(read_toxigen_dir(inputs.toxigen), task_rng(seed, "toxigen"),
                                 holdout_fractions(p.test_fraction["toxigen"], p.dev_fraction)),
        "bbq": build_bbq(read_bbq_dir(inputs.bbq, BBQ_CATEGORIES), task_rng(seed, "bbq"),
                         holdout_fractions(p.test_fraction["bbq"], p.dev_fraction)),
    }
    out = {}
    for task, df in tables.items():
        df = cap_items(df, p.max_items, task_rng(seed, task + ":cap"))
        check_splits(df)
        for split in SPLITS:
            labels = set(df.loc[df["split"] == split, "label"])
            if labels != {"pos", "neg"}:
                raise ValueError(f"{task}: the {split} split has labels {sorted(labels)}; both pos "
                                 "and neg are needed (raise max_items or change the fractions)")
        out[task] = df
    return out


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    tables = prepare_attributes(inputs, params.prepare_attributes, params.seed)
    for task, df in tables.items():
        write_parquet(df, out.attributes / f"{task}.parquet", metadata={"seed": str(params.seed)})
        counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
        items = df.groupby("split")["item_id"].nunique().to_dict()
        log.info("%s: %d rows, items per split %s\n%s", task, len(df), items, counts)
    log.info("done in %.1f s", time.perf_counter() - t0)
