"""The four MAT-Steer losses, each computed for all attributes at once (no Python loop).

Shapes: T attributes, n examples per attribute in a batch, D hidden size.
- MMD (RBF kernel, bandwidth sigma * scale) between steered negatives and original positives,
  per attribute, averaged over attributes. Biased (V-statistic) estimator:
      MMD^2(X, Y) = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y),  k(x, y) = exp(-|x-y|^2 / 2s^2)
- sparsity     = mean |g| over the gates (all T) of negative examples
- preservation = mean g^2 over the gates (all T) of positive examples
- orthogonality = sum over pairs i < j of cos^2(theta_i, theta_j)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COS_EPS = 1e-8


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [..., n, D], y [..., m, D] -> squared Euclidean distances [..., n, m], clamped >= 0."""
    xx = (x * x).sum(-1)  # [..., n]
    yy = (y * y).sum(-1)  # [..., m]
    xy = x @ y.transpose(-1, -2)  # [..., n, m]
    return (xx.unsqueeze(-1) + yy.unsqueeze(-2) - 2.0 * xy).clamp_min(0.0)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Biased squared MMD with an RBF kernel, batched: x [..., n, D], y [..., m, D] -> [...]."""
    if bandwidth <= 0:
        raise ValueError(f"MMD bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * bandwidth * bandwidth)
    z = torch.cat([x, y], dim=-2)  # [..., n+m, D]
    k = torch.exp(-gamma * pairwise_sq_dists(z, z))  # [..., n+m, n+m]
    n = x.shape[-2]
    kxx = k[..., :n, :n].mean(dim=(-1, -2))
    kyy = k[..., n:, n:].mean(dim=(-1, -2))
    kxy = k[..., :n, n:].mean(dim=(-1, -2))
    return kxx + kyy - 2.0 * kxy


def sparsity_loss(neg_gates: torch.Tensor) -> torch.Tensor:
    """Mean |g| over gates [N_neg, T] of negative examples (L1: few attributes fire per input)."""
    return neg_gates.abs().mean()


def preservation_loss(pos_gates: torch.Tensor) -> torch.Tensor:
    """Mean g^2 over gates [N_pos, T] of positive examples (leave desired behaviour alone)."""
    return pos_gates.pow(2).mean()


def orthogonality_loss(vectors: torch.Tensor) -> torch.Tensor:
    """Sum over pairs i < j of cos^2(theta_i, theta_j); vectors [T, D]. Zero for T == 1."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)  # [T, D]
    cos2 = (unit @ unit.T).pow(2)  # [T, T]
    return (cos2.sum() - cos2.diagonal().sum()) / 2.0


@dataclass(frozen=True)
class LossWeights:
    mmd: float = 1.0
    sparse: float = 0.9
    ortho: float = 0.1
    pos: float = 0.9


def mat_steer_losses(module: torch.nn.Module, pos: torch.Tensor, neg: torch.Tensor,
                     ref_pos: torch.Tensor, weights: LossWeights, bandwidth: float,
                     ) -> dict[str, torch.Tensor]:
    """All four losses for one batch, every attribute at once.

    pos, neg: [T, n, D] positives / negatives of each attribute (row t = attribute t's examples).
    ref_pos:  [T, m, D] an independent sample of attribute t's original positives (MMD target).
    Returns {"total", "mmd", "sparse", "pos", "ortho"} (scalars).
    """
    t, n, d = neg.shape
    pos_gates = module.gates(pos.reshape(-1, d))  # [T*n, T]
    steered, neg_gates = module(neg.reshape(-1, d))  # [T*n, D], [T*n, T]; positives need no
    mmd = mmd_rbf(steered.reshape(t, n, d), ref_pos, bandwidth).mean()  # steering, only gates
    sparse = sparsity_loss(neg_gates)
    keep = preservation_loss(pos_gates)
    ortho = orthogonality_loss(module.steering_vectors)
    total = weights.mmd * mmd + weights.sparse * sparse + weights.ortho * ortho + weights.pos * keep
    return {"total": total, "mmd": mmd, "sparse": sparse, "pos": keep, "ortho": ortho}


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
