"""MAT-Steer training on the union of the attributes' train splits; model choice on dev only.

Reference sampling: per batch and attribute, `n = min(batch_size // (2T), min_samples)`
positives, as many negatives and an independent sample of positives as the MMD target (each
drawn without replacement), `ceil(min_samples / n)` batches per epoch, where min_samples is the
smallest pos or neg count over the attributes. All indices of an epoch are drawn at once and the
losses are computed for all attributes in one pass (see losses.py for the "seed" and "targeted"
objectives). With gate_init "probe" the gates start as L2 logistic probes (probe.py), optionally
rescaled to a dev operating point (`gate_target`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from steerline.mat_steer.activations import PosNeg
from steerline.mat_steer.diagnostics import attribute_diagnostics
from steerline.mat_steer.losses import (
    LossWeights,
    Objective,
    mat_steer_losses,
    median_pairwise_distance,
    mmd_rbf,
    orthogonality_loss,
    weighted_total,
)
from steerline.mat_steer.probe import fit_probe
from steerline.steering.gated import SteeringModule

# "median_distance": train on a / s, s = median distance; "none": s = 1
ScaleMode = Literal["median_distance", "none"]
GateInit = Literal["random", "probe"]  # "probe": gates start as L2 logistic probes
# "equal": MMD averaged over attributes; "relative": each attribute's MMD divided by its
# MMD(neg, pos) before steering on train (times their mean), so every attribute counts
MmdWeighting = Literal["equal", "relative"]


@dataclass(frozen=True)
class TrainConfig:
    """train_steering's values come from params.yaml (pipeline.train_steering.train_config); no
    defaults here to drift from them. The string fields are checked once, by the params schema
    (objective, scale) or derived from objective there (gate_init, mmd_weighting)."""

    lr: float
    batch_size: int
    epochs: int
    sigma: float  # objective "seed": the RBF bandwidth (units of `scale`)
    weights: LossWeights
    scale: ScaleMode
    patience: int  # epochs without dev improvement before stopping; 0 = never stop early
    init_scale: float
    seed: int
    objective: Objective  # see losses.py
    bandwidths: tuple[float, ...]  # objective "targeted": summed RBF kernels
    gate_init: GateInit
    probe_cs: tuple[float, ...]  # probe C grid, chosen by dev AUROC
    mmd_weighting: MmdWeighting
    # gate_init "probe": rescale each probe gate so that its dev medians are gate_target on
    # negatives and 1 - gate_target on positives (None: the probe as fitted); the factor is the
    # gate's temperature in the detection term, which then keeps that sharpness
    gate_target: float | None

    def kernel_bandwidths(self) -> tuple[float, ...]:
        """The RBF bandwidths of the MMD term, in units of `scale`."""
        return (self.sigma,) if self.objective == "seed" else tuple(self.bandwidths)


def activation_scale(train: Mapping[str, PosNeg], mode: ScaleMode, seed: int = 0) -> float:
    """The unit in which training happens: the median distance between training activations
    ("median_distance"), or 1 ("none": raw activations, the reference code's setting).

    The reference hyperparameters (lr 1e-3, sigma 2.0, init 0.01) are not scale-free: the default
    model's residual stream has norms ~150 and pairwise distances ~150, where a bandwidth of 2 makes
    every kernel value exp(-2800) = 0 (no MMD gradient) and Adam's 1e-3 steps grow the steering
    vectors far slower than the gates (whose logits move by ~1e-3 x |a|_1 per step) close. Training
    on a / s and mapping back (`to_raw_units`) is exactly the same model in raw units."""
    if mode == "none":
        return 1.0
    allacts = torch.cat([torch.cat([d.pos, d.neg]) for d in train.values()])
    g = torch.Generator().manual_seed(seed)
    return median_pairwise_distance(allacts, generator=g)


def scaled(data: Mapping[str, PosNeg], scale: float) -> dict[str, PosNeg]:
    return {k: PosNeg(v.pos / scale, v.neg / scale) for k, v in data.items()}


@torch.no_grad()
def to_raw_units(module: SteeringModule, scale: float) -> SteeringModule:
    """A module trained on a / scale as the same function of raw activations a:
    g(a) = sigmoid((w / s) . a + b); a + sum g (s theta), renormalized to |a|."""
    raw = SteeringModule(module.hidden_size, module.n_attributes)
    raw.steering_vectors.copy_(module.steering_vectors * scale)
    raw.gate_weight.copy_(module.gate_weight / scale)
    raw.gate_bias.copy_(module.gate_bias)
    return raw.eval()


class Stacked:
    """Attributes' pos / neg activations padded into [T, max_n, D] tensors for batched gathers."""

    def __init__(self, data: Mapping[str, PosNeg]) -> None:
        self.names = list(data)
        self.n_pos = torch.tensor([len(d.pos) for d in data.values()])
        self.n_neg = torch.tensor([len(d.neg) for d in data.values()])
        self.pos = _pad_stack([d.pos for d in data.values()])  # [T, P_max, D]
        self.neg = _pad_stack([d.neg for d in data.values()])  # [T, Q_max, D]

    def batch_plan(self, batch_size: int) -> tuple[int, int]:
        """(per-attribute batch size n, batches per epoch), as in the reference code."""
        t = len(self.names)
        min_samples = int(min(self.n_pos.min(), self.n_neg.min()))
        n = max(1, min(batch_size // (2 * t), min_samples))
        return n, math.ceil(min_samples / n)

    def sample(self, n_batches: int, n: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices [n_batches, T, n] of pos, neg and MMD-target pos, without replacement within
        each (batch, attribute)."""
        return (_sample(self.n_pos, n_batches, n, gen), _sample(self.n_neg, n_batches, n, gen),
                _sample(self.n_pos, n_batches, n, gen))

    def gather(self, which: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """which [T, max_n, D], idx [..., T, n] -> [..., T, n, D]."""
        t, width, d = which.shape
        # index_select on the flattened rows: the same copy as which[arange(T)[:, None], idx],
        # ~4x faster on CPU than advanced indexing
        flat = idx + torch.arange(t).unsqueeze(1) * width  # [..., T, n] row of [T * max_n]
        return which.reshape(t * width, d).index_select(0, flat.flatten()).view(*idx.shape, d)


def _pad_stack(xs: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(x) for x in xs)
    out = torch.zeros(len(xs), width, xs[0].shape[1])
    for i, x in enumerate(xs):
        out[i, : len(x)] = x
    return out


def _sample(counts: torch.Tensor, n_batches: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform samples of n distinct indices below counts[t]: [n_batches, T, n]."""
    width = int(counts.max())
    keys = torch.rand(n_batches, len(counts), width, generator=gen)
    keys = keys.masked_fill(torch.arange(width) >= counts.unsqueeze(1), 2.0)
    return keys.topk(n, dim=-1, largest=False).indices


LOSS_KEYS = ("total", "mmd", "sparse", "pos", "ortho", "gate")
GATHER_CHUNK = 16  # batches gathered at once (bounded memory: 16 x T x n x D floats per kind)
# Intra-op CPU threads of the training steps. One: a step is ~100 small ops on [batch, D]
# tensors, where handing work to a second thread and waking it (OMP_WAIT_POLICY=PASSIVE, as the
# stages run) costs more than it saves (bench/mat_steer.py: 0.71 -> 0.46 s per epoch on 2
# cores). It also keeps the trained weights independent of the machine's core count. A larger
# batch_size may gain from more threads; on CUDA this is moot.
TRAIN_THREADS = 1


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside the block and restored on exit."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_epoch(module: SteeringModule, opt: torch.optim.Optimizer, stacked: Stacked, n: int,
              n_batches: int, gen: torch.Generator, weights: LossWeights,
              bandwidth: float | tuple[float, ...], objective: Objective,
              mmd_weights: torch.Tensor | None = None,
              gate_temperature: float | torch.Tensor = 1.0) -> dict[str, float]:
    """One epoch of Adam steps (on TRAIN_THREADS threads); returns the sum over batches of each
    loss."""
    with intra_op_threads(TRAIN_THREADS):
        pos_idx, neg_idx, ref_idx = stacked.sample(n_batches, n, gen)  # [n_batches, T, n] each
        sums = torch.zeros(len(LOSS_KEYS))
        for c0 in range(0, n_batches, GATHER_CHUNK):  # one gather per chunk of batches
            sl = slice(c0, c0 + GATHER_CHUNK)
            pos = stacked.gather(stacked.pos, pos_idx[sl])
            neg = stacked.gather(stacked.neg, neg_idx[sl])
            ref = stacked.gather(stacked.pos, ref_idx[sl])  # [chunk, T, n, D] each
            for b in range(pos.shape[0]):
                losses = mat_steer_losses(module, pos[b], neg[b], ref[b], weights, bandwidth,
                                          objective, mmd_weights, gate_temperature)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()
                sums += torch.stack([losses[k].detach() if k in losses else torch.zeros(())
                                     for k in LOSS_KEYS])
        return dict(zip(LOSS_KEYS, sums.tolist(), strict=True))


@torch.no_grad()
def dev_metrics(module: SteeringModule, dev: Mapping[str, PosNeg], weights: LossWeights,
                bandwidth: float | tuple[float, ...], objective: Objective,
                mmd_weights: torch.Tensor | None = None,
                gate_temperature: float | torch.Tensor = 1.0) -> dict[str, float]:
    """Deterministic dev objective (the training losses on the full dev sets) plus per-attribute
    gate diagnostics, keys like "loss/total" and "<attribute>/gate_auroc"."""
    out: dict[str, float] = {}
    mmds, neg_gates, pos_gates, gate_terms = [], [], [], []
    for t, (name, d) in enumerate(dev.items()):
        diag = attribute_diagnostics(module, t, d.pos, d.neg, bandwidth)
        out.update({f"{name}/{k}": v for k, v in diag.items()})
        mmds.append(diag["mmd_after"])
        z_neg, z_pos = module.gate_logits(d.neg), module.gate_logits(d.pos)  # [Q, T], [P, T]
        g_neg = torch.sigmoid(z_neg)
        if objective == "targeted":  # gates of the attributes these negatives do not violate
            g_neg = torch.cat([g_neg[:, :t], g_neg[:, t + 1:]], dim=1)
        neg_gates.append(g_neg.flatten())
        pos_gates.append(torch.sigmoid(z_pos))
        temp = float(gate_temperature[t] if isinstance(gate_temperature, torch.Tensor)
                     else gate_temperature)
        gate_terms.append(0.5 * temp * float(F.softplus(z_pos[:, t] / temp).mean()
                                             + F.softplus(-z_neg[:, t] / temp).mean()))
    mmd = float(np.mean(mmds) if mmd_weights is None else
                np.mean(np.asarray(mmds) * mmd_weights.numpy()))
    flat_neg = torch.cat(neg_gates)
    sparse = float(flat_neg.abs().mean()) if flat_neg.numel() else 0.0
    keep = float(torch.cat(pos_gates).pow(2).mean())
    ortho = float(orthogonality_loss(module.steering_vectors))
    gate = float(np.mean(gate_terms)) if objective == "targeted" else 0.0
    out.update({"loss/mmd": mmd, "loss/sparse": sparse, "loss/pos": keep, "loss/ortho": ortho,
                "loss/gate": gate})
    out["loss/total"] = weighted_total(weights, mmd, sparse, ortho, keep, gate)
    return out


@dataclass
class TrainResult:
    module: SteeringModule  # the best epoch's weights (lowest dev loss/total), in raw units
    best_epoch: int
    epochs_run: int
    scale: float  # activation unit s used in training
    bandwidths: tuple[float, ...]  # RBF bandwidths of the MMD term in raw units (x s)
    gate_temperatures: tuple[float, ...]  # per attribute (1.0 without a gate_target)
    history: list[dict[str, float]]


EpochCallback = Callable[[int, dict[str, float], dict[str, float]], None]


def train_mat_steer(train: Mapping[str, PosNeg], dev: Mapping[str, PosNeg], cfg: TrainConfig,
                    on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train on `train`, choose the epoch with the lowest dev objective (never looks at test)."""
    if list(train) != list(dev):
        raise ValueError(f"train and dev attributes differ: {list(train)} vs {list(dev)}")
    dims = {d.pos.shape[1] for d in train.values()} | {d.neg.shape[1] for d in train.values()}
    if len(dims) != 1:
        raise ValueError(f"attributes have different hidden sizes {sorted(dims)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    module = SteeringModule(dims.pop(), len(train), cfg.init_scale, generator=gen)
    scale = activation_scale(train, cfg.scale, cfg.seed)
    train, dev = scaled(train, scale), scaled(dev, scale)
    temperatures = torch.ones(len(train))
    if cfg.gate_init == "probe":
        temperatures = init_gates_from_probes(module, train, dev, cfg.probe_cs, cfg.gate_target)
    bandwidth = cfg.kernel_bandwidths()  # in units of `scale`
    mmd_weights = attribute_mmd_weights(train, bandwidth, cfg.mmd_weighting, cfg.seed)
    stacked = Stacked(train)
    n, n_batches = stacked.batch_plan(cfg.batch_size)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    best = (math.inf, -1, copy.deepcopy(module.state_dict()))
    history: list[dict[str, float]] = []
    since_best, epoch = 0, -1
    bar = tqdm(range(cfg.epochs), desc="train_steering", unit="epoch")
    for epoch in bar:
        module.train()
        sums = run_epoch(module, opt, stacked, n, n_batches, gen, cfg.weights, bandwidth,
                         cfg.objective, mmd_weights, temperatures)
        train_means = {f"train/{k}": v / n_batches for k, v in sums.items()}
        module.eval()
        dev_out = {f"dev/{k}": v for k, v in dev_metrics(
            module, dev, cfg.weights, bandwidth, cfg.objective, mmd_weights,
            temperatures).items()}
        history.append({"epoch": epoch, **train_means, **dev_out})
        if on_epoch is not None:
            on_epoch(epoch, train_means, dev_out)
        score = dev_out["dev/loss/total"]
        if score < best[0]:
            best, since_best = (score, epoch, copy.deepcopy(module.state_dict())), 0
        else:
            since_best += 1
        bar.set_postfix(train=f"{train_means['train/total']:.4f}", dev=f"{score:.4f}",
                        best=best[1])
        if cfg.patience and since_best >= cfg.patience:
            break
    module.load_state_dict(best[2])
    return TrainResult(module=to_raw_units(module, scale), best_epoch=best[1],
                       epochs_run=epoch + 1, scale=scale,
                       bandwidths=tuple(b * scale for b in bandwidth),
                       gate_temperatures=tuple(temperatures.tolist()), history=history)


MMD_WEIGHT_ROWS = 512  # rows per class for the before-steering MMD of each attribute


@torch.no_grad()
def attribute_mmd_weights(train: Mapping[str, PosNeg], bandwidth: tuple[float, ...],
                          mode: MmdWeighting, seed: int) -> torch.Tensor | None:
    """Per-attribute MMD weights [T]: "relative" = mean_t(b_t) / b_t with b_t = MMD(neg, pos) of
    attribute t before steering on (a seeded subsample of) the train split; "equal" = None (a
    plain average)."""
    if mode == "equal":
        return None
    gen = torch.Generator().manual_seed(seed)
    before = []
    for name, d in train.items():
        pos = d.pos[torch.randperm(len(d.pos), generator=gen)[:MMD_WEIGHT_ROWS]]
        neg = d.neg[torch.randperm(len(d.neg), generator=gen)[:MMD_WEIGHT_ROWS]]
        b = float(mmd_rbf(neg, pos, bandwidth))
        if not b > 0:
            raise ValueError(f"attribute {name!r}: positives and negatives have MMD {b} on train "
                             "(identical distributions?): relative MMD weighting needs > 0")
        before.append(b)
    b = torch.tensor(before, dtype=torch.float32)
    return b.mean() / b


@torch.no_grad()
def init_gates_from_probes(module: SteeringModule, train: Mapping[str, PosNeg],
                           dev: Mapping[str, PosNeg], cs: tuple[float, ...],
                           target: float | None = None) -> torch.Tensor:
    """Set gate t to attribute t's L2 logistic probe (negatives = 1; C chosen on dev); with a
    `target`, rescale it about the midpoint of its dev medians so that the median dev gate is
    `target` on negatives and 1 - target on positives. Returns the factors [T] (1.0 = unscaled;
    at least 1, so a gate is never made softer than its probe)."""
    if target is not None and not 0.5 < target < 1.0:
        raise ValueError(f"gate_target must be in (0.5, 1), got {target}")
    factors = torch.ones(len(train))
    for t, name in enumerate(train):
        probe = fit_probe(train[name].pos, train[name].neg, dev[name].pos, dev[name].neg, cs)
        weight, bias = probe.weight, probe.bias
        if target is not None:
            m_pos = float(probe.scores(dev[name].pos).median())
            m_neg = float(probe.scores(dev[name].neg).median())
            if not m_neg > m_pos:
                raise ValueError(f"attribute {name!r}: its probe does not separate the dev split "
                                 f"(median logit on negatives {m_neg:.3f} <= positives "
                                 f"{m_pos:.3f}); use gate_target null or more data")
            factor = max(1.0, math.log(target / (1 - target)) / ((m_neg - m_pos) / 2))
            centre = (m_neg + m_pos) / 2
            weight, bias = weight * factor, factor * (bias - centre)
            factors[t] = factor
        module.gate_weight[t].copy_(weight)
        module.gate_bias[t] = bias
    return factors


