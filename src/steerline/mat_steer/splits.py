"""MAT-Steer attribute tables' splits: train / dev / test by group, seeded per task, and the
per-split cap on evaluation items (see mat_steer/datasets.py for the tables and their groups)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from steerline.core.splits import shuffled_groups

SPLITS = ("train", "dev", "test")


def task_rng(seed: int, task: str) -> np.random.Generator:
    """An independent, deterministic generator per (seed, task)."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def row_balanced_split(groups: Sequence[str], fractions: Mapping[str, float],
                       rng: np.random.Generator) -> np.ndarray:
    """Assign every row a split so that all rows of a group share one split.

    Groups are visited in a seeded random order (core.splits.shuffled_groups) and each goes to
    the split furthest below its target share of rows (greedy), so row proportions follow
    `fractions` closely: an attribute's groups differ in size (a BBQ template has up to 48 rows),
    unlike the safety table's units, which are cut by count (steermoe/data/safety_splits.py).
    groups: [N] group id per row. Returns [N] split names.
    """
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    uniq, inverse, order = shuffled_groups(groups, rng)  # [G], [N], [G]
    counts = np.bincount(inverse, minlength=len(uniq))  # [G] rows per group
    names = list(fractions)
    target = np.array([fractions[s] for s in names]) * len(inverse)
    filled = np.zeros(len(names))
    assigned = np.empty(len(uniq), dtype=object)
    for g in order:
        k = int(np.argmax(target - filled))
        assigned[g] = names[k]
        filled[k] += counts[g]
    return assigned[inverse].astype(str)


def holdout_fractions(test_fraction: float, dev_fraction: float) -> dict[str, float]:
    """Test held out first, the rest split (1 - dev_fraction) / dev_fraction into train / dev."""
    if not 0 < test_fraction < 1 or not 0 < dev_fraction < 1:
        raise ValueError("test_fraction and dev_fraction must be in (0, 1)")
    rest = 1.0 - test_fraction
    return {"train": rest * (1 - dev_fraction), "dev": rest * dev_fraction, "test": test_fraction}


def cap_items(df: pd.DataFrame, max_items: Mapping[str, int | None],
              rng: np.random.Generator) -> pd.DataFrame:
    """Keep at most max_items[split] evaluation items (all their rows) per split, seeded."""
    keep = []
    for split in SPLITS:
        items = df.loc[df["split"] == split, "item_id"].unique()
        cap = max_items.get(split)
        if cap is not None and len(items) > cap:
            items = rng.choice(np.sort(items), size=cap, replace=False)
        keep.extend(items)
    return df[df["item_id"].isin(set(keep))].reset_index(drop=True)
