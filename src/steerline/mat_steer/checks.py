"""The leak and label checks an attribute table passes before prepare_attributes writes it."""

from __future__ import annotations

import pandas as pd

from steerline.core.splits import groups_across_splits
from steerline.mat_steer.datasets import dedup_key
from steerline.mat_steer.splits import SPLITS


def check_splits(df: pd.DataFrame) -> None:
    """Raise if a group, an item or an identical (dedup_key) text appears in two splits."""
    for col in ("group_id", "item_id"):
        bad = groups_across_splits(df[col], df["split"])
        if len(bad):
            raise ValueError(f"{len(bad)} {col}s cross splits, e.g. {bad[0]!r}")
    bad = groups_across_splits(df["text"].map(dedup_key), df["split"])
    if len(bad):
        raise ValueError(f"the same text appears in two splits: {bad[0]!r}")
    if df["example_id"].duplicated().any():
        raise ValueError("duplicate example_id")
    bad_split = set(df["split"]) - set(SPLITS)
    bad_label = set(df["label"]) - {"pos", "neg"}
    if bad_split or bad_label:
        raise ValueError(f"unknown splits {bad_split} or labels {bad_label}")
