"""Paired bootstrap confidence intervals over evaluation items.

Two conditions scored on the same items give per-item values a [n], b [n]; the difference of
their means is resampled by drawing items with replacement (the same draw for both conditions).
The average over several metrics resamples each task's items independently (stratified by task)
and averages the metric differences of one draw; metrics of one task (TruthfulQA MC1 / MC2)
share that task's draw.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

CI_LEVEL = 0.95


def _interval(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def paired_bootstrap(per_item: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     metric_task: Mapping[str, str], n_boot: int, seed: int
                     ) -> dict[str, dict[str, float]]:
    """Mean difference a - b and its percentile 95% CI for every metric and for their average.

    per_item: metric -> (a [n_task], b [n_task]) per-item values of the two conditions, rows
    aligned by item; metric_task: metric -> its task (metrics of one task share item draws).
    Returns {metric: {"diff", "lo", "hi"}, ..., "average": {...}}.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    for metric, (a, b) in per_item.items():
        task = metric_task[metric]
        if len(a) != len(b) or len(a) == 0:
            raise ValueError(f"{metric}: paired values need equal, non-zero lengths "
                             f"(got {len(a)} and {len(b)})")
        if sizes.setdefault(task, len(a)) != len(a):
            raise ValueError(f"{metric}: {len(a)} items but task {task!r} has {sizes[task]}")
    draws = {task: rng.integers(0, n, size=(n_boot, n)) for task, n in sizes.items()}
    out: dict[str, dict[str, float]] = {}
    boot = []
    for metric, (a, b) in per_item.items():
        d = np.asarray(a, np.float64) - np.asarray(b, np.float64)  # [n]
        bd = d[draws[metric_task[metric]]].mean(axis=1)  # [n_boot]
        boot.append(bd)
        lo, hi = _interval(bd)
        out[metric] = {"diff": float(d.mean()), "lo": lo, "hi": hi}
    avg = np.mean(boot, axis=0)  # [n_boot]
    lo, hi = _interval(avg)
    out["average"] = {"diff": float(np.mean([v["diff"] for v in out.values()])), "lo": lo, "hi": hi}
    return out
