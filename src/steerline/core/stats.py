"""The statistics of every evaluation: Wilson intervals, exact McNemar tests and agreement for
rates over prompts, paired bootstrap intervals for per-item scores.

Every unit is one prompt or item, never a token: a rate is k refusals out of n prompts, two
variants answered the same prompts are compared by their discordant pairs, and two conditions
scored on the same items are compared by resampling the items (`paired_bootstrap`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

Z95 = 1.959963984540054  # standard normal quantile 0.975
CI_LEVEL = 0.95  # paired bootstrap intervals


def round_p(p: float, digits: int = 3) -> float:
    """A p-value rounded to `digits` significant digits for a metrics file: a fixed number of
    decimals would write p = 9.5e-07 as 0.0, which reads as impossible."""
    return float(f"{float(p):.{digits}g}")


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (default 95%) of a proportion k / n; n must be >= 1."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the bounds (k = 0: lower 0; k = n: upper 1), which float rounding would miss
    lo = 0.0 if k == 0 else max(0.0, float(centre - half))
    hi = 1.0 if k == n else min(1.0, float(centre + half))
    return lo, hi


def rate(flags: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """k, n, rate and its Wilson 95% interval of a boolean vector (one flag per prompt)."""
    x = np.asarray(flags, dtype=bool)
    k, n = int(x.sum()), int(x.size)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci_low": lo, "ci_high": hi}


def mcnemar_exact(variant: Sequence[bool] | np.ndarray,
                  reference: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two paired boolean vectors (same prompts, same order): a two-sided
    binomial test of the discordant pairs against 1/2. `gained` = prompts flagged only by
    `variant`, `lost` = only by `reference`; p = 1 when there is no discordant pair."""
    v, r = np.asarray(variant, dtype=bool), np.asarray(reference, dtype=bool)
    if v.shape != r.shape:
        raise ValueError(f"paired test needs equal lengths, got {v.shape} and {r.shape}")
    gained, lost = int((v & ~r).sum()), int((~v & r).sum())
    n = gained + lost
    p = float(binomtest(gained, n, 0.5).pvalue) if n else 1.0
    return {"gained": gained, "lost": lost, "n_discordant": n, "p_value": p,
            "difference_points": 100 * (gained - lost) / v.size if v.size else 0.0}


def agreement(gold: Sequence[bool] | np.ndarray,
              pred: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Accuracy, Cohen's kappa, precision / recall of the positive class and the confusion
    matrix {"tp", "fp", "fn", "tn"} of predictions against gold labels."""
    g, p = np.asarray(gold, dtype=bool), np.asarray(pred, dtype=bool)
    if g.shape != p.shape or g.size == 0:
        raise ValueError(f"agreement needs two non-empty vectors of one length, got {g.shape} "
                         f"and {p.shape}")
    tp, fp = int((g & p).sum()), int((~g & p).sum())
    fn, tn = int((g & ~p).sum()), int((~g & ~p).sum())
    acc = (tp + tn) / g.size
    pe = g.mean() * p.mean() + (1 - g.mean()) * (1 - p.mean())  # chance agreement
    kappa = float((acc - pe) / (1 - pe)) if pe < 1 else 1.0
    return {
        "n": int(g.size),
        "n_positive": int(g.sum()),
        "accuracy": float(acc),
        "accuracy_ci95": list(wilson(tp + tn, int(g.size))),
        "cohen_kappa": kappa,
        "precision": tp / (tp + fp) if tp + fp else None,  # None: undefined (JSON null)
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def _interval(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def paired_bootstrap(per_item: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     metric_task: Mapping[str, str], n_boot: int, seed: int
                     ) -> dict[str, dict[str, float]]:
    """Mean difference a - b and its percentile 95% CI for every metric and for their average.

    Paired bootstrap confidence intervals over evaluation items.

    Two conditions scored on the same items give per-item values a [n], b [n]; the difference of
    their means is resampled by drawing items with replacement (the same draw for both conditions).
    The average over several metrics resamples each task's items independently (stratified by task)
    and averages the metric differences of one draw; metrics of one task (TruthfulQA MC1 / MC2)
    share that task's draw.

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
