"""The MAT-Steer losses, each computed for all attributes at once (no Python loop).

Shapes: T attributes, n examples per attribute in a batch, D hidden size.
- MMD (RBF kernel) between steered negatives and original positives, per attribute, averaged
  over attributes (optionally weighted per attribute). Biased (V-statistic) estimator:
      MMD^2(X, Y) = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y),  k(x, y) = exp(-|x-y|^2 / 2s^2)
  With several bandwidths s the kernel is their sum.
- sparsity     = mean |g| over gates of negative examples:
    objective "seed":     all T gates of every negative;
    objective "targeted": only the gates of the attributes the negative does NOT violate
                          (gate t' != t on a negative of attribute t).
- preservation = mean g^2 over the gates (all T) of positive examples
- orthogonality = sum over pairs i < j of cos^2(theta_i, theta_j)
- gate detection (objective "targeted" only) = cross-entropy of each attribute's own gate as a
  detector of its negatives (0 on its positives, 1 on its negatives).

Why "targeted" (docs/ablations.md): under the `seed` objective nothing rewards a gate for
being open on its own negatives except MMD, whose gradient is of the order of MMD itself (~1e-2
on the default model), while L1 sparsity pulls every gate of a negative down with a constant
lambda_sparse and preservation pulls positives' gates with only 2 lambda_pos g: the gates learn
to be more closed on negatives than on positives (dev AUROC 0.44 / 0.34 / 0.24), with or without
the MMD term. Sparsity exists so that only the violated attribute fires; it must not act on the
gate that MMD needs open, and the gate needs a signal that says which inputs violate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from steerline.steering.gated import renormalize

COS_EPS = 1e-8


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [..., n, D], y [..., m, D] -> squared Euclidean distances [..., n, m], clamped >= 0."""
    xx = (x * x).sum(-1)  # [..., n]
    yy = (y * y).sum(-1)  # [..., m]
    xy = x @ y.transpose(-1, -2)  # [..., n, m]
    return (xx.unsqueeze(-1) + yy.unsqueeze(-2) - 2.0 * xy).clamp_min(0.0)


Bandwidth = float | Sequence[float]
# checked once, by the params schema (train_steering.objective); no default here to drift from it
Objective = Literal["seed", "targeted"]


def _bandwidths(bandwidth: Bandwidth) -> list[float]:
    bws = [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(b) for b in
                                                                         bandwidth]
    if not bws or any(not b > 0 for b in bws):
        raise ValueError(f"MMD bandwidths must be > 0 (at least one), got {bandwidth}")
    return bws


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: Bandwidth) -> torch.Tensor:
    """Biased squared MMD with an RBF kernel (a sum of RBF kernels for several bandwidths),
    batched: x [..., n, D], y [..., m, D] -> [...]."""
    bws = _bandwidths(bandwidth)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = pairwise_sq_dists(a, b)  # [..., len(a), len(b)]
        k = torch.exp(-d2 / (2.0 * bws[0] * bws[0]))
        for bw in bws[1:]:
            k = k + torch.exp(-d2 / (2.0 * bw * bw))
        return k.mean(dim=(-1, -2))

    # The three blocks separately, not the Gram matrix of cat([x, y]): the y-x block is never
    # computed, and when only x carries gradient (steered vs original activations) the backward
    # pass skips y's blocks (~10% of a training epoch, bench/mat_steer.py).
    return kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)


def sparsity_loss(neg_gates: torch.Tensor) -> torch.Tensor:
    """Mean |g| over gates [N_neg, T] of negative examples (L1: few attributes fire per input)."""
    return neg_gates.abs().mean()


def targeted_sparsity_loss(neg_gates: torch.Tensor) -> torch.Tensor:
    """Mean gate over the gates of attributes an example does not violate: neg_gates [T, n, T]
    (row t = negatives of attribute t, column = gate); the diagonal gates t == t' are excluded.
    Zero for T == 1 (no other attribute)."""
    t = neg_gates.shape[0]
    if t == 1:
        return neg_gates.sum() * 0.0
    off = ~torch.eye(t, dtype=torch.bool, device=neg_gates.device)  # [T, T]
    return neg_gates.abs().masked_select(off.unsqueeze(1)).mean()


def preservation_loss(pos_gates: torch.Tensor) -> torch.Tensor:
    """Mean g^2 over gates [N_pos, T] of positive examples (leave desired behaviour alone)."""
    return pos_gates.pow(2).mean()


def orthogonality_loss(vectors: torch.Tensor) -> torch.Tensor:
    """Sum over pairs i < j of cos^2(theta_i, theta_j); vectors [T, D]. Zero for T == 1."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)  # [T, D]
    cos2 = (unit @ unit.T).pow(2)  # [T, T]
    return (cos2.sum() - cos2.diagonal().sum()) / 2.0


def gate_detection_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor,
                        temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Binary cross-entropy of each attribute's own gate as a detector of its negatives:
    pos_logits / neg_logits [T, n, T] gate logits of attribute t's positives / negatives (row t);
    only the diagonal gate t of row t is scored (target 0 on positives, 1 on negatives), on
    logits / temperature_t, times temperature_t (so the gradient per logit stays that of plain
    cross-entropy: sigmoid(z / temperature) - target)."""
    t = pos_logits.shape[0]
    idx = torch.arange(t, device=pos_logits.device)
    temp = torch.as_tensor(temperature, dtype=pos_logits.dtype).expand(t)  # [T]
    own_pos = pos_logits[idx, :, idx] / temp.unsqueeze(1)  # [T, n]
    own_neg = neg_logits[idx, :, idx] / temp.unsqueeze(1)  # [T, n]
    per = 0.5 * (F.softplus(own_pos).mean(1) + F.softplus(-own_neg).mean(1))  # [T]
    return (per * temp).mean()


Loss = torch.Tensor | float  # a scalar loss: a 0-d tensor (training) or a float (dev)


@dataclass(frozen=True)
class LossWeights:
    """The four losses' weights (params.yaml's top-level lambda_*; no defaults here)."""

    mmd: float
    sparse: float
    ortho: float
    pos: float
    gate: float  # objective "targeted" only: the gate detection (cross-entropy) term


def weighted_total(weights: LossWeights, mmd: Loss, sparse: Loss, ortho: Loss, keep: Loss,
                   gate: Loss | None) -> Loss:
    """The objective: the weighted sum of the losses (tensors in training, floats on dev), in
    this one order so training and dev totals round alike; `gate` None adds no gate term."""
    total = weights.mmd * mmd + weights.sparse * sparse + weights.ortho * ortho + weights.pos * keep
    return total if gate is None else total + weights.gate * gate


def mat_steer_losses(module: torch.nn.Module, pos: torch.Tensor, neg: torch.Tensor,
                     ref_pos: torch.Tensor, weights: LossWeights, bandwidth: Bandwidth,
                     objective: Objective, mmd_weights: torch.Tensor | None = None,
                     gate_temperature: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
    """All losses for one batch, every attribute at once.

    pos, neg: [T, n, D] positives / negatives of each attribute (row t = attribute t's examples).
    ref_pos:  [T, m, D] an independent sample of attribute t's original positives (MMD target).
    objective: "seed" (the published four losses: sparsity on every gate of a negative) or
    "targeted" (sparsity only on the gates of the attributes a negative does not violate, plus
    the gate detection term weighted by weights.gate).
    mmd_weights: [T] per-attribute weights of the MMD average (None: equal weights).
    gate_temperature: a float or one per attribute [T]; the detection term scores gate t's logits
    divided by its temperature, so the gates it calibrates are that many times sharper than a
    probe's probabilities (1.0: plain cross-entropy).
    Returns {"total", "mmd", "sparse", "pos", "ortho"} (scalars), plus "gate" for "targeted".
    """
    t, n, d = neg.shape
    pos_logits = module.gate_logits(pos.reshape(-1, d))  # [T*n, T]
    pos_gates = torch.sigmoid(pos_logits)
    neg_logits = module.gate_logits(neg.reshape(-1, d))  # [T*n, T]
    neg_gates = torch.sigmoid(neg_logits)
    shifted = torch.addmm(neg.reshape(-1, d), neg_gates, module.steering_vectors)  # [T*n, D]
    steered = renormalize(neg.reshape(-1, d), shifted)  # positives need no steering, only gates
    per_attribute = mmd_rbf(steered.reshape(t, n, d), ref_pos, bandwidth)  # [T]
    mmd = per_attribute.mean() if mmd_weights is None else (per_attribute * mmd_weights).mean()
    keep = preservation_loss(pos_gates)
    ortho = orthogonality_loss(module.steering_vectors)
    if objective == "seed":
        sparse = sparsity_loss(neg_gates)
    else:
        sparse = targeted_sparsity_loss(neg_gates.reshape(t, n, t))
    out = {"mmd": mmd, "sparse": sparse, "pos": keep, "ortho": ortho}
    gate = None
    if objective == "targeted":
        gate = gate_detection_loss(pos_logits.reshape(t, n, t), neg_logits.reshape(t, n, t),
                                   gate_temperature)
        out["gate"] = gate
    return {"total": weighted_total(weights, mmd, sparse, ortho, keep, gate), **out}


def median_pairwise_distance(acts: torch.Tensor, max_rows: int = 2048,
                             generator: torch.Generator | None = None) -> float:
    """Median Euclidean distance between distinct rows of acts [N, D] (a subsample of rows)."""
    if acts.shape[0] < 2:
        raise ValueError("need at least 2 activations to compute a median distance")
    if acts.shape[0] > max_rows:
        idx = torch.randperm(acts.shape[0], generator=generator)[:max_rows]
        acts = acts[idx]
    d2 = pairwise_sq_dists(acts.double(), acts.double())
    iu = torch.triu_indices(acts.shape[0], acts.shape[0], offset=1)
    return float(d2[iu[0], iu[1]].sqrt().median())
