"""The safety table's splits: rows joined into units (a look-alike pair, a group, a paired chat's
two sides) and the units of every stratum cut into detect / dev / test, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from steerline.core.splits import shuffled_groups


class Units:
    """Rows joined into units that stay in one split: union-find over row numbers 0..n-1, each
    unit's root its first row in file order (the root of a join is the smaller one)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def join(self, rows: Sequence[int]) -> None:
        """Put `rows` (row numbers) in one unit, with every row already joined to them."""
        for r in rows[1:]:
            a, b = self.root(rows[0]), self.root(r)
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> list[int]:
        """Each row's unit, by its root row: [n]."""
        return [self.root(i) for i in range(len(self.parent))]


def stratified_unit_split(
    df: pd.DataFrame, detect_fraction: float, dev_fraction: float, seed: int,
    source_order: Sequence[str],
) -> pd.Series:
    """'detect' / 'dev' / 'test' per row (columns source, pair_id, stratum): within every stratum
    (sources in `source_order`, each source's strata sorted; one generator for all, so a source
    added last leaves the others' splits as they were) the units (rows sharing a pair_id) are
    shuffled
    (core.splits.shuffled_groups); the first round(detect_fraction * n) go to detect, the next
    round(dev_fraction * n) to dev, the rest to test: cut by unit count, where mat_steer's
    row_balanced_split balances rows (the committed table is this cut's bytes)."""
    if not (0 < detect_fraction and 0 < dev_fraction and detect_fraction + dev_fraction < 1):
        raise ValueError(f"split fractions need detect > 0, dev > 0 and detect + dev < 1, got "
                         f"detect {detect_fraction}, dev {dev_fraction}")
    rng = np.random.default_rng(seed)
    unit_split: dict[str, str] = {}
    position = {name: i for i, name in enumerate(source_order)}
    for _, grp in sorted(df.groupby("stratum"),
                         key=lambda kv: (position[kv[1]["source"].iloc[0]], kv[0])):
        units, _, order = shuffled_groups(grp["pair_id"], rng)  # [U] sorted, -, [U]
        n = len(units)
        n_detect = int(np.floor(detect_fraction * n + 0.5))
        n_dev = int(np.floor(dev_fraction * n + 0.5))
        for k, u in enumerate(units[order]):
            unit_split[str(u)] = ("detect" if k < n_detect else
                                  "dev" if k < n_detect + n_dev else "test")
    return df["pair_id"].map(unit_split)
