"""A researcher's own MAT-Steer attribute: a file of (prompt, positive, negative, group) rows ->
its attribute table (columns: mat_steer/datasets.py), split by group (docs/own_behaviour.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from steerline.core.errors import UserError
from steerline.mat_steer.datasets import attribute_frame, dedup_key
from steerline.mat_steer.splits import row_balanced_split

# a user attribute file's columns (keys of a jsonl line): one contrast per row
USER_COLUMNS = ("prompt", "positive", "negative", "group")
USER_FORMATS = ("csv", "jsonl", "parquet")


class AttributeFileError(UserError):
    """A user attribute file that cannot be used; the message names the file, the row and the
    fix."""


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a null cell


def _completion(path: str, where: str, column: str, value: object) -> str:
    """A positive / negative cell as text; null, non-text and blank cells are errors."""
    if _is_null(value) or (isinstance(value, str) and not value.strip()):
        raise AttributeFileError(f"{path}: {where}, column {column!r}, is "
                                 f"{'null' if _is_null(value) else 'blank'}: give it the "
                                 f"{column} completion, or remove the row")
    if not isinstance(value, str):
        raise AttributeFileError(f"{path}: {where}, column {column!r}, holds {value!r} "
                                 f"({type(value).__name__}), not text: every completion must "
                                 "be a string")
    return value.strip()


def _group(path: str, where: str, value: object) -> str:
    """A group cell as text (jsonl / parquet may hold integers); null or blank is an error."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if not isinstance(value, str) or not value.strip():
        shown = "null" if _is_null(value) else repr(value)
        raise AttributeFileError(f"{path}: {where}, column 'group', holds {shown}: give every "
                                 "row a group (rows of one group stay in one split; a row of its "
                                 "own can take its row number)")
    return value.strip()


def build_user_attribute(name: str, path: str, table: pd.DataFrame, where: Sequence[str],
                         rng: np.random.Generator, fractions: Mapping[str, float]
                         ) -> pd.DataFrame:
    """A user file's rows -> one pos and one neg row per file row, split by group.

    table: USER_COLUMNS as read (the prompts already checked, e.g. by read_prompt_table), in
    file order; where: each row's place for messages ("row 3", "line 3"). The item is the row:
    prompt, choices [positive, negative], correct_idx 0 (the positive completion should be the
    likelier one). A prompt repeated in the file or a row whose completions are the same text
    (one label only) is an AttributeFileError."""
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for i, (rec, at) in enumerate(zip(table.to_dict("records"), where, strict=True)):
        prompt = str(rec["prompt"]).strip()
        key = dedup_key(prompt)
        if key in seen:
            raise AttributeFileError(f"{path}: {at} repeats the prompt of {seen[key]} "
                                     f"({prompt[:60]!r}): one row per prompt, remove or reword "
                                     "one")
        seen[key] = at
        pos, neg = (_completion(path, at, c, rec[c]) for c in ("positive", "negative"))
        if dedup_key(pos) == dedup_key(neg):
            raise AttributeFileError(f"{path}: {at} has the same positive and negative "
                                     f"completion ({pos[:60]!r}): one label only; make the "
                                     "negative the behaviour to steer away from")
        item = f"{name}:{i:05d}"
        base = {"task": name, "group_id": f"{name}:{_group(path, at, rec['group'])}",
                "item_id": item, "subset": "", "prompt": prompt, "choices": [pos, neg],
                "correct_idx": 0}
        for label, completion in (("pos", pos), ("neg", neg)):
            rows.append({**base, "example_id": f"{item}:{label}", "label": label,
                         "text": f"{prompt} {completion}"})
    df = attribute_frame(rows)
    df["split"] = row_balanced_split(df["group_id"], fractions, rng)
    return df
