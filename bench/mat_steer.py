"""Bench: one MAT-Steer training epoch, this implementation vs a faithful reference-style loop.

D=4096, T=3 attributes, 3,000 examples per attribute (1,500 pos + 1,500 neg), batch 96 (16 per
attribute and label), reference defaults. The reference-style loop follows its training function:
per batch and attribute torch.randperm over the full sets, Python lists of labels, per-attribute
MMD with masks, per-pair orthogonality over a list of vectors. Both compute the same losses:
checked on shared samples to 1e-5 before timing. Goal: ratio >= 3. Last line: one JSON object
(bench contract: bench, ratio, equal, goal, baseline).

Each runs as it would: the reference-style loop on torch's default threads, ours on its
TRAIN_THREADS (1: its steps are too small to gain from a second thread that sleeps between ops
under OMP_WAIT_POLICY=PASSIVE). `ratio_same_threads` times the reference-style loop on
TRAIN_THREADS as well, so the speedup cannot be read as a thread-count effect alone.
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin (see dvc.yaml)

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from quick import QUICK  # noqa: E402

from steerline.mat_steer.activations import PosNeg  # noqa: E402
from steerline.mat_steer.losses import LossWeights, mat_steer_losses  # noqa: E402
from steerline.mat_steer.train import (  # noqa: E402
    TRAIN_THREADS,
    Stacked,
    intra_op_threads,
    run_epoch,
)
from steerline.steering.gated import SteeringModule, renormalize

T, BATCH, SIGMA, LR = 3, 96, 2.0, 1e-3
D, PER_LABEL = (256, 96) if QUICK else (4096, 1500)
W = LossWeights(mmd=1.0, sparse=0.9, ortho=0.1, pos=0.9, gate=0.0)  # the published weights
REPEATS = 1 if QUICK else 5  # medians of 5 interleaved epochs each: this shared machine's noise


# ---------------------------------------------------------------- reference-style reference loop
def compute_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma * sigma))

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def orthogonality_pairs(vectors: list[torch.Tensor]) -> torch.Tensor:
    loss = torch.tensor(0.0)
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            loss = loss + F.cosine_similarity(vectors[i], vectors[j], dim=0).pow(2)
    return loss


def seed_batch_losses(model: SteeringModule, tasks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      eb: int, bandwidth: float, pick=None) -> dict[str, torch.Tensor]:
    """The seed's per-batch computation. `pick(t, kind)` gives indices (default: randperm)."""
    pick = pick or (lambda t, kind, n: torch.randperm(n)[:eb])
    acts, labels, task_idx = [], [], []
    for t, name in enumerate(tasks):
        pos_acts, neg_acts = tasks[name]
        acts.append(pos_acts[pick(t, "pos", pos_acts.shape[0])])
        acts.append(neg_acts[pick(t, "neg", neg_acts.shape[0])])
        labels.extend([1] * eb)
        labels.extend([0] * eb)
        task_idx.extend([t] * eb * 2)
    x = torch.cat(acts, dim=0)
    y = torch.tensor(labels, dtype=torch.float32)
    ti = torch.tensor(task_idx, dtype=torch.long)
    adjusted, gates = model(x)  # already renormalized inside the module
    loss_mmd = 0
    for t, name in enumerate(tasks):
        mask = ti == t
        task_acts, task_lbls = adjusted[mask], y[mask]
        neg_adj = task_acts[task_lbls == 0]
        original_pos = tasks[name][0]
        ref = original_pos[pick(t, "ref", original_pos.shape[0])]
        loss_mmd = loss_mmd + compute_mmd(neg_adj, ref, bandwidth)
    loss_mmd = loss_mmd / len(tasks)
    loss_sparse = gates[y == 0].abs().mean()
    loss_pos = gates[y == 1].pow(2).mean()
    loss_ortho = orthogonality_pairs([sv for sv in model.steering_vectors])
    total = W.mmd * loss_mmd + W.sparse * loss_sparse + W.ortho * loss_ortho + W.pos * loss_pos
    return {"total": total, "mmd": loss_mmd, "sparse": loss_sparse, "pos": loss_pos,
            "ortho": loss_ortho}


def seed_epoch(model, opt, tasks, bandwidth) -> float:
    min_samples = min(min(p.shape[0], n.shape[0]) for p, n in tasks.values())
    eb = max(1, min(BATCH // (2 * len(tasks)), min_samples))
    total = 0.0
    for _ in range(0, min_samples, eb):
        losses = seed_batch_losses(model, tasks, eb, bandwidth)
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
        total += losses["total"].item()
    return total


# ---------------------------------------------------------------- bench
def main() -> None:
    g = torch.Generator().manual_seed(0)
    shifts = torch.randn(T, D, generator=g)
    data = {f"attr{t}": PosNeg(torch.randn(PER_LABEL, D, generator=g),
                               torch.randn(PER_LABEL, D, generator=g) + shifts[t])
            for t in range(T)}
    tasks = {k: (v.pos, v.neg) for k, v in data.items()}
    bandwidth = SIGMA * math.sqrt(2 * D)  # ~ sigma x the median distance of this data
    stacked = Stacked(data)
    n, n_batches = stacked.batch_plan(BATCH)

    # same losses on shared samples (same weights, no update)
    model = SteeringModule(D, T, 0.01, generator=torch.Generator().manual_seed(1))
    pos_i, neg_i, ref_i = stacked.sample(5, n, torch.Generator().manual_seed(2))
    worst = 0.0
    torch.set_grad_enabled(False)
    for b in range(5):
        ours = mat_steer_losses(model, stacked.gather(stacked.pos, pos_i[b]),
                                stacked.gather(stacked.neg, neg_i[b]),
                                stacked.gather(stacked.pos, ref_i[b]), W, bandwidth, "seed")
        chosen = {"pos": pos_i[b], "neg": neg_i[b], "ref": ref_i[b]}
        ref = seed_batch_losses(model, tasks, n, bandwidth,
                                pick=lambda t, kind, _n, c=chosen: c[kind][t])
        worst = max(worst, *(abs(float(ours[k] - ref[k])) for k in ours))
    torch.set_grad_enabled(True)
    x = torch.randn(8, D)
    same_forward = torch.allclose(model(x)[0],
                                  renormalize(x, x + model.gates(x) @ model.steering_vectors))
    equal = bool(worst < 1e-5 and same_forward)

    ours_t, seed_t, seed_same_t = [], [], []
    for r in range(REPEATS):
        m1 = SteeringModule(D, T, 0.01, generator=torch.Generator().manual_seed(r))
        o1 = torch.optim.Adam(m1.parameters(), lr=LR)
        t0 = time.perf_counter()
        run_epoch(m1, o1, stacked, n, n_batches, torch.Generator().manual_seed(r), W, bandwidth,
                  "seed")
        ours_t.append(time.perf_counter() - t0)
        m2 = SteeringModule(D, T, 0.01, generator=torch.Generator().manual_seed(r))
        o2 = torch.optim.Adam(m2.parameters(), lr=LR)
        torch.manual_seed(r)
        t0 = time.perf_counter()
        seed_epoch(m2, o2, tasks, bandwidth)
        seed_t.append(time.perf_counter() - t0)
        m3 = SteeringModule(D, T, 0.01, generator=torch.Generator().manual_seed(r))
        o3 = torch.optim.Adam(m3.parameters(), lr=LR)
        torch.manual_seed(r)
        with intra_op_threads(TRAIN_THREADS):
            t0 = time.perf_counter()
            seed_epoch(m3, o3, tasks, bandwidth)
            seed_same_t.append(time.perf_counter() - t0)
    ours_s, seed_s = statistics.median(ours_t), statistics.median(seed_t)
    seed_same_s = statistics.median(seed_same_t)
    print(f"D={D} T={T} {2 * PER_LABEL} examples/attribute, {n_batches} batches of "
          f"{2 * n * T}; losses equal to {worst:.1e} (goal < 1e-5)")
    print(f"epoch seconds (median of {REPEATS}): reference-style {seed_s:.3f} "
          f"({torch.get_num_threads()} threads) / {seed_same_s:.3f} ({TRAIN_THREADS} thread), "
          f"ours {ours_s:.3f} ({TRAIN_THREADS} thread)")
    print(f"mat_steer epoch speedup: {seed_s / ours_s:.2f}x (goal >= 3)")
    print(json.dumps({
        "bench": "mat_steer", "ratio": round(seed_s / ours_s, 2), "equal": equal,
        "goal": "ratio >= 3", "baseline": "seed_style_loop", "max_loss_diff": worst,
        "ratio_same_threads": round(seed_same_s / ours_s, 2),
        "ours_epoch_s": round(ours_s, 4), "seed_style_epoch_s": round(seed_s, 4),
        "seed_style_same_threads_epoch_s": round(seed_same_s, 4), "train_threads": TRAIN_THREADS,
        "repeats": REPEATS, "hidden_size": D, "attributes": T, "batches": n_batches,
        "torch_threads": torch.get_num_threads(), "quick": QUICK,
    }))


if __name__ == "__main__":
    main()
