"""L2-regularised logistic-regression probes: the linear ceiling for a gate, and a gate init.

A probe for attribute t scores activations a [N, D] as w . a + b with negatives (the violating
examples) as the positive class, exactly as a gate does; C (inverse L2 strength) is chosen by
dev AUROC. Fitting uses activations divided by `scale` (their median pairwise distance) so that
one grid of C values means the same on any model; the returned weights are in raw units.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from steerline.mat_steer.diagnostics import auroc

MAX_ITER = 2000


@dataclass(frozen=True)
class Probe:
    weight: torch.Tensor  # [D], raw activation units
    bias: float
    C: float
    dev_auroc: float

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [N, D] -> logits [N] (high = negative / violating)."""
        return acts @ self.weight + self.bias


def _xy(pos: torch.Tensor, neg: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = torch.cat([pos, neg]).double().numpy()  # [P+Q, D]
    y = np.r_[np.zeros(len(pos)), np.ones(len(neg))]
    return x, y


def probe_auroc(probe: Probe, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """AUROC of the probe's logits on pos [P, D] / neg [Q, D], neg = the positive class."""
    s = torch.cat([probe.scores(pos), probe.scores(neg)]).numpy()
    return auroc(s, np.r_[np.zeros(len(pos), bool), np.ones(len(neg), bool)])


def fit_probe(train_pos: torch.Tensor, train_neg: torch.Tensor, dev_pos: torch.Tensor,
              dev_neg: torch.Tensor, cs: Sequence[float], scale: float = 1.0) -> Probe:
    """Fit one L2 logistic probe per C on train, keep the C with the best dev AUROC (ties: the
    smaller C, i.e. the stronger regularisation)."""
    if not cs or any(c <= 0 for c in cs):
        raise ValueError(f"probe C values must be a non-empty list of positives, got {list(cs)}")
    if scale <= 0:
        raise ValueError(f"probe scale must be > 0, got {scale}")
    x, y = _xy(train_pos / scale, train_neg / scale)
    best: Probe | None = None
    for c in sorted(cs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, y)
        weight = torch.from_numpy(model.coef_[0] / scale).float()
        probe = Probe(weight, float(model.intercept_[0]), float(c), float("nan"))
        dev = probe_auroc(probe, dev_pos, dev_neg)
        if best is None or dev > best.dev_auroc:
            best = Probe(weight, probe.bias, float(c), dev)
    assert best is not None
    return best
