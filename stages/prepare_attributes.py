"""Stage prepare_attributes: data/raw/{truthfulqa,bbq,toxigen} -> data/attributes/{task}.parquet.

One row per text (see steerline.mat_steer.data for the columns, formats and grouping); splits are
grouped, seeded and checked for leakage before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from steerline.core.io import write_parquet
from steerline.core.params import PrepareAttributes, load_params
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

RAW = Path("data/raw")
OUT = Path("data/attributes")
log = logging.getLogger("prepare_attributes")


def prepare_attributes(raw: Path, p: PrepareAttributes, seed: int) -> dict[str, pd.DataFrame]:
    """Pure: the three attribute tables from the raw folders."""
    if set(p.truthfulqa_fractions) != set(SPLITS):
        raise ValueError(f"prepare_attributes.truthfulqa_fractions needs keys {SPLITS}")
    mc = json.loads((raw / "truthfulqa" / "mc_task.json").read_text())
    tables = {
        "truthfulqa": build_truthfulqa(mc, task_rng(seed, "truthfulqa"), p.truthfulqa_fractions,
                                       p.truthfulqa_answers_per_label),
        "toxigen": build_toxigen(read_toxigen_dir(raw / "toxigen"), task_rng(seed, "toxigen"),
                                 holdout_fractions(p.test_fraction["toxigen"], p.dev_fraction)),
        "bbq": build_bbq(read_bbq_dir(raw / "bbq", BBQ_CATEGORIES), task_rng(seed, "bbq"),
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    tables = prepare_attributes(RAW, params.prepare_attributes, params.seed)
    for task, df in tables.items():
        write_parquet(df, OUT / f"{task}.parquet", metadata={"seed": str(params.seed)})
        counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
        items = df.groupby("split")["item_id"].nunique().to_dict()
        log.info("%s: %d rows, items per split %s\n%s", task, len(df), items, counts)
    log.info("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(main)
