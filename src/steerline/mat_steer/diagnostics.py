"""Gate and distribution diagnostics on held-out activations (dev during training, test after).

Gates are trained to open on NEGATIVE (violating) inputs and stay closed on positives, so the gate
is scored as a detector of negatives: AUROC with neg = the positive class (the reference evaluate()
had this inverted).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from steerline.mat_steer.losses import Bandwidth, mmd_rbf
from steerline.steering.gated import SteeringModule


def auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); NaN if one class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def attribute_diagnostics(module: SteeringModule, index: int, pos: torch.Tensor,
                          neg: torch.Tensor, bandwidth: Bandwidth) -> dict[str, float]:
    """Attribute `index`'s gate on its own pos [P, D] / neg [Q, D] activations, and
    MMD(neg, pos) before and after steering the negatives (with every gate of the module)."""
    g_pos = module.gates(pos)[:, index]  # [P]
    steered_neg, gates_neg = module(neg)  # [Q, D], [Q, T]
    g_neg = gates_neg[:, index]  # [Q]
    scores = torch.cat([g_pos, g_neg]).numpy()
    labels = np.r_[np.zeros(len(g_pos), bool), np.ones(len(g_neg), bool)]
    others = [t for t in range(module.n_attributes) if t != index]
    return {
        "gate_mean_pos": float(g_pos.mean()),
        "gate_mean_neg": float(g_neg.mean()),
        "gate_median_pos": float(g_pos.median()),
        "gate_median_neg": float(g_neg.median()),
        # the other attributes' gates on this attribute's negatives (what sparsity acts on)
        "other_gates_mean_neg": float(gates_neg[:, others].mean()) if others else 0.0,
        "gate_auroc": auroc(scores, labels),
        "gate_open_frac_neg": float((g_neg > 0.5).float().mean()),
        "gate_open_frac_pos": float((g_pos > 0.5).float().mean()),
        "mmd_before": float(mmd_rbf(neg, pos, bandwidth)),
        "mmd_after": float(mmd_rbf(steered_neg, pos, bandwidth)),
    }
