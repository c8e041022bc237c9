"""What eval_baselines and eval_steering share: the dev and test items each task is scored on,
and the scorer (per-item values of every metric with a steering function hooked at one layer,
timed; a scale picked on dev). Both stages draw the same items from the same seed, so their
per-item values pair up item by item."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerline.core.params import EvalSteering
from steerline.mat_steer.evaluate import (
    Prefix,
    evaluate_items,
    item_prefixes,
    means,
    metric_task,
    task_items,
)
from steerline.mat_steer.splits import task_rng
from steerline.model.arch import layer_slice_unsupported

log = logging.getLogger("eval_steering")
Values = dict[str, np.ndarray]  # metric -> per-item values
# eval_baselines' folder: per-item test values and the dev choices
VALUES, CHOICES = "values.parquet", "choices.json"


def eval_items(tables: dict[str, pd.DataFrame], p: EvalSteering, seed: int,
               tasks: list[str]) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """(test items, dev items) per task (params' attributes, in order): the whole split or a
    seeded sample of it (an attribute without a max_test_items key: the whole test split)."""
    test = {t: task_items(tables[t], "test", p.max_test_items.get(t),
                          task_rng(seed, t + ":test"))
            for t in tasks}
    dev = {t: task_items(tables[t], "dev", p.max_dev_items, task_rng(seed, t + ":dev"))
           for t in tasks}
    return test, dev


@dataclass
class Scorer:
    """Scores steering conditions on the stage's item sets ("dev", "test").

    Every condition edits the output of decoder layer `layer`, so layers 0..layer compute the
    same for all of them: the first run on an item set keeps those states (item_prefixes) and
    every run, the first included, runs only the layers after `layer` (score_prefix; the same
    values bit for bit as the hooked full forward, tests/test_prefix_scoring.py). A model whose
    layers cannot be sliced (layer_slice_unsupported) is scored by the full forward."""
    model: torch.nn.Module
    tokenizer: Any
    layer: int
    max_rows: int
    items: dict[str, dict[str, pd.DataFrame]]  # item set ("dev", "test") -> task -> items
    seconds: dict[str, float] = field(default_factory=dict)  # wall clock per run: timings only
    _prefixes: dict[str, dict[str, Prefix]] = field(default_factory=dict, repr=False)

    def _prefix(self, split: str) -> dict[str, Prefix] | None:
        if split not in self._prefixes:
            reason = layer_slice_unsupported(self.model)
            if reason is not None:
                log.info("scoring by the full forward (%s)", reason)
                return None
            t0 = time.perf_counter()
            self._prefixes[split] = item_prefixes(self.model, self.tokenizer, self.items[split],
                                                  self.layer, self.max_rows, split)
            self.seconds[f"{split} prefix"] = round(time.perf_counter() - t0, 1)
            log.info("%s prefix (layers 0..%d): %.1f MB held (%.0f s)", split, self.layer,
                     sum(p.nbytes for p in self._prefixes[split].values()) / 1e6,
                     self.seconds[f"{split} prefix"])
        return self._prefixes[split]

    def run(self, name: str, split: str, fn: Any) -> Values:
        prefixes = self._prefix(split)
        t0 = time.perf_counter()
        out = evaluate_items(self.model, self.tokenizer, self.items[split], self.layer, fn,
                             self.max_rows, name, prefixes)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s (%.0f s)", name, {k: round(float(v.mean()), 4) for k, v in out.items()},
                 self.seconds[name])
        return out

    def pick(self, name: str, scales: list[float], make_fn: Callable[[float], Any],
             extend: int = 0) -> tuple[float, dict, str | None]:
        """The scale with the best dev average over the metrics (no dev run for one scale), the
        dev sweep, and which edge of the grid the pick still sits at (None: inside it).

        A best scale at the top of the grid adds 2x it, at the bottom half of it, up to `extend`
        points per side, so a sweep that is still rising at its edge finds where it stops."""
        if len(scales) == 1:
            return scales[0], {}, None
        sweep: dict[str, dict[str, float]] = {}

        def score(s: float) -> float:
            if f"{s:g}" not in sweep:
                sweep[f"{s:g}"] = means(self.run(f"{name} dev x{s:g}", "dev", make_fn(s)))
            return sweep[f"{s:g}"]["average"]

        grid = sorted(scales)
        for s in grid:
            score(s)
        added = {"top": 0, "bottom": 0}
        while True:
            best = max(grid, key=score)  # ties: the first, i.e. the smaller scale
            edge = "top" if best == grid[-1] else "bottom" if best == grid[0] else None
            if edge is None or added[edge] >= extend:
                return best, sweep, edge
            added[edge] += 1
            grid = [*grid, best * 2] if edge == "top" else [best / 2, *grid]


def item_rows(values: dict[str, Values], test_items: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (condition, metric, test item), in the conditions' and metrics' order."""
    rows = []
    for cond, vals in values.items():
        for metric, v in vals.items():
            ids = test_items[metric_task(metric)]["item_id"]
            rows.append(pd.DataFrame({"condition": cond, "metric": metric,
                                      "item_id": ids.to_numpy(), "value": v}))
    return pd.concat(rows, ignore_index=True)


def values_from_rows(rows: pd.DataFrame, test_items: dict[str, pd.DataFrame]
                     ) -> dict[str, Values]:
    """item_rows read back: condition -> metric -> values, in the rows' order; one error when
    the rows were scored on other test items than `test_items` (other seed or item caps)."""
    out: dict[str, Values] = {}
    for (cond, metric), g in rows.groupby(["condition", "metric"], sort=False):
        want = test_items[metric_task(str(metric))]["item_id"]
        if not np.array_equal(g["item_id"].to_numpy(), want.to_numpy()):
            raise ValueError(f"the baselines' {cond} {metric} values are for other test items "
                             "than this run's (seed or max_test_items changed): re-run "
                             "eval_baselines")
        out.setdefault(str(cond), {})[str(metric)] = g["value"].to_numpy()
    return out
