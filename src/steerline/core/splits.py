"""The two primitives every grouped split in the project shares (MAT-Steer's attribute tables,
mat_steer/splits.py; the safety prompt table, steermoe/data/safety_splits.py): the seeded order
in which groups are dealt to splits, and the leak test "a group found in two splits".

How groups are then assigned differs on purpose and stays with each table: MAT-Steer balances
rows greedily over its train / dev / test fractions, the safety table cuts unit counts per
stratum. Both must keep their exact draws (the committed tables are their bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def shuffled_groups(groups: Sequence[str] | np.ndarray | pd.Series, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct groups sorted [G], each row's index into them [N], and the seeded order [G]
    in which a split visits them (one rng.permutation(G) draw).

    groups: [N] group id per row (strings; sorted by Python's string order)."""
    uniq, inverse = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    return uniq, inverse, rng.permutation(len(uniq))


def groups_across_splits(groups: pd.Series, splits: pd.Series) -> pd.Index:
    """The groups (sorted) whose rows lie in more than one split: a leak. Rows with a null
    group or split are not counted. groups, splits: [N], aligned."""
    n = splits.groupby(groups).nunique()  # [G] distinct splits per group
    return n.index[n > 1]
