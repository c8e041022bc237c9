"""Stage prepare_attributes: the attributes of params.yaml's `attributes` (raw TruthfulQA,
ToxiGen and BBQ by default, or a user's file of (prompt, positive, negative, group) rows) -> one
attribute table per attribute.

One row per text (see steerline.mat_steer.datasets for the columns, formats and grouping);
splits are grouped, seeded and checked for leakage before anything is written. A user file's path
must lie inside one of the stage's deps in dvc.yaml (data/examples by default), checked under
`dvc repro`: a file DVC does not track would leave the table stale with `dvc status` clean.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from steerline.core.io import write_parquet
from steerline.core.params import (
    Attribute,
    Params,
    PrepareAttributes,
    UserAttributeParams,
    attribute_name,
    load_yaml,
)
from steerline.core.prompt_table import read_prompt_table
from steerline.mat_steer.checks import check_splits
from steerline.mat_steer.datasets import (
    BBQ_CATEGORIES,
    build_bbq,
    build_toxigen,
    build_truthfulqa,
    read_bbq_dir,
    read_toxigen_dir,
)
from steerline.mat_steer.splits import SPLITS, cap_items, holdout_fractions, task_rng
from steerline.mat_steer.user_attribute import (
    USER_COLUMNS,
    USER_FORMATS,
    AttributeFileError,
    build_user_attribute,
)

STAGE = "prepare_attributes"
COLUMN_FIX = ("an attribute file has the columns (jsonl: keys) prompt, positive, negative and "
              "group (docs/own_behaviour.md#your-own-mat-steer-attribute)")
log = logging.getLogger(STAGE)


@dataclass(frozen=True)
class Inputs:
    truthfulqa: Path  # mc_task.json
    toxigen: Path  # folder of ToxiGen files
    bbq: Path  # folder of BBQ category files


@dataclass(frozen=True)
class Outputs:
    attributes: Path  # folder: {task}.parquet


def read_user_attribute(entry: UserAttributeParams, p: PrepareAttributes, seed: int
                        ) -> pd.DataFrame:
    """A user attribute file -> its table (split by group, with the dev_fraction of the
    built-ins); every unusable file is one error naming it, the row and the fix."""
    fmt = PurePosixPath(entry.path).suffix.lower().lstrip(".")
    if fmt not in USER_FORMATS:
        raise AttributeFileError(f"{entry.path}: attribute {entry.name!r} is a .{fmt or '(none)'}"
                                 f" file: write it as {', '.join(USER_FORMATS)}")
    table, where = read_prompt_table(entry.path, fmt, "prompt", list(USER_COLUMNS[1:]),
                                     dict.fromkeys(USER_COLUMNS, COLUMN_FIX))
    return build_user_attribute(entry.name, entry.path, table, where, task_rng(seed, entry.name),
                                holdout_fractions(entry.test_fraction, p.dev_fraction))


def build_attribute(entry: Attribute, inputs: Inputs, p: PrepareAttributes, seed: int
                    ) -> pd.DataFrame:
    """One attribute's table before capping: a built-in from its raw files, or a user file."""
    if entry == "truthfulqa":
        mc = json.loads(inputs.truthfulqa.read_text())
        return build_truthfulqa(mc, task_rng(seed, "truthfulqa"), p.truthfulqa_fractions,
                                p.truthfulqa_answers_per_label)
    if entry == "toxigen":
        return build_toxigen(read_toxigen_dir(inputs.toxigen), task_rng(seed, "toxigen"),
                             holdout_fractions(p.test_fraction["toxigen"], p.dev_fraction))
    if entry == "bbq":
        return build_bbq(read_bbq_dir(inputs.bbq, BBQ_CATEGORIES), task_rng(seed, "bbq"),
                         holdout_fractions(p.test_fraction["bbq"], p.dev_fraction))
    return read_user_attribute(entry, p, seed)


def prepare_attributes(inputs: Inputs, p: PrepareAttributes, seed: int,
                       attributes: list[Attribute]) -> dict[str, pd.DataFrame]:
    """Pure: the attribute tables from the raw files, in the order of `attributes`."""
    if set(p.truthfulqa_fractions) != set(SPLITS):
        raise ValueError(f"prepare_attributes.truthfulqa_fractions needs keys {SPLITS}")
    tables = {attribute_name(entry): build_attribute(entry, inputs, p, seed)
              for entry in attributes}
    files = {a.name: a.path for a in attributes if not isinstance(a, str)}
    out = {}
    for task, df in tables.items():
        df = cap_items(df, p.max_items, task_rng(seed, task + ":cap"))
        check_splits(df)
        for split in SPLITS:
            labels = set(df.loc[df["split"] == split, "label"])
            if labels != {"pos", "neg"}:
                fix = (f"add rows of new groups to {files[task]}, or change its test_fraction"
                       if task in files else "raise max_items or change the fractions")
                raise ValueError(f"{task}: the {split} split has labels {sorted(labels)}; both pos "
                                 f"and neg are needed ({fix})")
        out[task] = df
    return out


def _inside(path: str, dep: str) -> bool:
    file, folder = PurePosixPath(os.path.normpath(path)), PurePosixPath(os.path.normpath(dep))
    return file == folder or folder in file.parents


def check_files_are_deps(attributes: list[Attribute], dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), every user file must lie inside a dep of the
    stage (the file or a folder above it): else a later edit of that file would leave the table
    stale with `dvc status` clean."""
    if os.environ.get("DVC_STAGE") != STAGE or not dvc_yaml.is_file():
        return
    deps = [str(d) for d in load_yaml(dvc_yaml)["stages"][STAGE]["deps"]]
    for entry in attributes:
        if not isinstance(entry, str) and not any(_inside(entry.path, d) for d in deps):
            raise AttributeFileError(
                f"{entry.path} (attribute {entry.name!r}) is not inside a dep of {STAGE} in "
                f"{dvc_yaml}: move it under data/examples/, or add its folder to the stage's "
                "deps, then dvc repro")


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    check_files_are_deps(params.attributes)
    tables = prepare_attributes(inputs, params.prepare_attributes, params.data_seed,
                                params.attributes)
    for task, df in tables.items():
        write_parquet(df, out.attributes / f"{task}.parquet",
                      metadata={"data_seed": str(params.data_seed)})
        counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
        items = df.groupby("split")["item_id"].nunique().to_dict()
        log.info("%s: %d rows, items per split %s\n%s", task, len(df), items, counts)
    log.info("done in %.1f s", time.perf_counter() - t0)
