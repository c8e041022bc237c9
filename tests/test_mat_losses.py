"""MAT-Steer module, losses (vs literal per-pair/per-attribute references), checkpoint, training."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from steerline.core.params import ParamsError, parse_params
from steerline.mat_steer.activations import PosNeg, split_pos_neg
from steerline.mat_steer.checkpoint import (
    SteeringConfig,
    check_compatible,
    load_steering,
    save_steering,
)
from steerline.mat_steer.diagnostics import auroc
from steerline.mat_steer.losses import (
    LossWeights,
    mat_steer_losses,
    mmd_rbf,
    orthogonality_loss,
    preservation_loss,
    sparsity_loss,
)
from steerline.mat_steer.train import Stacked, TrainConfig, to_raw_units, train_mat_steer
from steerline.steering.gated import SteeringModule

ROOT = Path(__file__).resolve().parents[1]
T, N, D = 3, 6, 10


def _module(seed: int = 0) -> SteeringModule:
    g = torch.Generator().manual_seed(seed)
    return SteeringModule(D, T, init_scale=0.5, generator=g)


def _ref_mmd(x: torch.Tensor, y: torch.Tensor, bw: float) -> float:
    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * bw * bw))

    kxx = sum(k(a, b) for a in x for b in x) / (len(x) ** 2)
    kyy = sum(k(a, b) for a in y for b in y) / (len(y) ** 2)
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


def test_mmd_matches_pairwise_reference() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(T, N, D), torch.randn(T, N + 2, D) + 0.5
    got = mmd_rbf(x, y, bandwidth=2.0)  # [T]
    for t in range(T):
        assert abs(float(got[t]) - _ref_mmd(x[t], y[t], 2.0)) < 1e-5
    assert float(mmd_rbf(x[0], x[0], 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_gate_losses_and_orthogonality_match_references() -> None:
    torch.manual_seed(1)
    gates = torch.rand(7, T)
    ref_sparse = sum(abs(float(g)) for g in gates.flatten()) / gates.numel()
    ref_pos = sum(float(g) ** 2 for g in gates.flatten()) / gates.numel()
    assert abs(float(sparsity_loss(gates)) - ref_sparse) < 1e-6
    assert abs(float(preservation_loss(gates)) - ref_pos) < 1e-6
    vecs = torch.randn(4, D)
    ref_ortho = sum(float(torch.nn.functional.cosine_similarity(vecs[i], vecs[j], dim=0)) ** 2
                    for i, j in itertools.combinations(range(4), 2))
    assert abs(float(orthogonality_loss(vecs)) - ref_ortho) < 1e-5
    assert float(orthogonality_loss(vecs[:1])) == 0.0


def test_total_loss_matches_seed_style_reference() -> None:
    """The batched losses equal the reference code's per-attribute loops on the same samples."""
    torch.manual_seed(2)
    module, w = _module(), LossWeights(1.0, 0.9, 0.1, 0.9, gate=0.0)
    pos, neg, ref = torch.randn(T, N, D), torch.randn(T, N, D) + 1.0, torch.randn(T, N, D)
    got = mat_steer_losses(module, pos, neg, ref, w, bandwidth=3.0, objective="seed")
    torch.set_grad_enabled(False)
    # seed layout: per attribute [pos block, neg block], labels 1/0, task index
    x = torch.cat([torch.cat([pos[t], neg[t]]) for t in range(T)])
    labels = torch.tensor(([1] * N + [0] * N) * T)
    task = torch.arange(T).repeat_interleave(2 * N)
    adjusted, gates = module(x)
    mmd = sum(_ref_mmd(adjusted[(task == t) & (labels == 0)], ref[t], 3.0) for t in range(T)) / T
    sparse = float(gates[labels == 0].abs().mean())
    keep = float(gates[labels == 1].pow(2).mean())
    sv = module.steering_vectors
    ortho = sum(float(torch.nn.functional.cosine_similarity(sv[i], sv[j], dim=0)) ** 2
                for i, j in itertools.combinations(range(T), 2))
    ref = {"mmd": mmd, "sparse": sparse, "pos": keep, "ortho": ortho,
           "total": mmd + 0.9 * sparse + 0.1 * ortho + 0.9 * keep}
    torch.set_grad_enabled(True)
    for k, v in ref.items():
        assert abs(float(got[k].detach()) - v) < 1e-5, k


def test_targeted_losses_match_literal_references() -> None:
    """Targeted sparsity: only gates t' != t of attribute t's negatives; gate term: the
    cross-entropy of each attribute's own gate (0 on its positives, 1 on its negatives)."""
    torch.manual_seed(3)
    module, w = _module(), LossWeights(1.0, 0.9, 0.1, 0.9, gate=0.7)
    pos, neg, ref = torch.randn(T, N, D), torch.randn(T, N, D) + 1.0, torch.randn(T, N, D)
    torch.set_grad_enabled(False)
    got = mat_steer_losses(module, pos, neg, ref, w, bandwidth=(1.0, 3.0), objective="targeted")
    seed = mat_steer_losses(module, pos, neg, ref, w, bandwidth=(1.0, 3.0), objective="seed")
    off, bce_pos, bce_neg = [], [], []
    for t in range(T):
        for i in range(N):
            g_neg = torch.sigmoid(module.gate_weight @ neg[t, i] + module.gate_bias)  # [T]
            g_pos = torch.sigmoid(module.gate_weight @ pos[t, i] + module.gate_bias)
            off += [float(g_neg[u]) for u in range(T) if u != t]
            bce_pos.append(-math.log(1 - float(g_pos[t])))
            bce_neg.append(-math.log(float(g_neg[t])))
    sparse = sum(off) / len(off)
    gate = 0.5 * (sum(bce_pos) / len(bce_pos) + sum(bce_neg) / len(bce_neg))
    steered, _ = module(neg.reshape(-1, D))
    mmd = sum(_ref_mmd(steered.reshape(T, N, D)[t], ref[t], 1.0)
              + _ref_mmd(steered.reshape(T, N, D)[t], ref[t], 3.0) for t in range(T)) / T
    torch.set_grad_enabled(True)
    assert abs(float(got["sparse"]) - sparse) < 1e-6
    assert abs(float(got["gate"]) - gate) < 1e-5
    assert abs(float(got["mmd"]) - mmd) < 1e-5
    for k in ("pos", "ortho", "mmd"):  # shared terms are the reference code's
        assert float(got[k]) == float(seed[k])
    expect = float(seed["total"]) + 0.9 * (sparse - float(seed["sparse"])) + 0.7 * gate
    assert abs(float(got["total"]) - expect) < 1e-5 and "gate" not in seed


@pytest.mark.parametrize("key, value", [("objective", "other"), ("scale", "unit")])
def test_training_modes_are_checked_once_by_the_params_schema(key, value) -> None:
    """TrainConfig's string modes are not re-checked by the library: params.yaml's schema
    refuses an unknown one, naming the key."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train_steering"][key] = value
    with pytest.raises(ParamsError, match=f"train_steering.{key}"):
        parse_params(raw)


def test_module_forward_equals_formula() -> None:
    module = _module(3)
    a = torch.randn(5, D) * 4
    steered, gates = module(a)
    for i in range(5):
        g = [torch.sigmoid(module.gate_weight[t] @ a[i] + module.gate_bias[t]) for t in range(T)]
        shifted = a[i] + sum(g[t] * module.steering_vectors[t] for t in range(T))
        expect = shifted * a[i].norm() / shifted.norm()
        torch.testing.assert_close(steered[i], expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gates[i], torch.stack(g), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(steered.norm(dim=1), a.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_zero_vectors_are_identity_bit_for_bit() -> None:
    module = _module(4)
    with torch.no_grad():
        module.steering_vectors.zero_()
    h = torch.randn(2, 7, D, dtype=torch.float32)
    assert torch.equal(module.steer(h), h)
    hb = h.to(torch.bfloat16)
    assert torch.equal(module.steer(hb), hb)


def test_checkpoint_round_trip_and_errors(tmp_path) -> None:
    module = _module(5)
    cfg = SteeringConfig(["a", "b", "c"], layer=1, hidden_size=D, model="tiny", training={"x": 1})
    save_steering(module, cfg, tmp_path / "ckpt")
    loaded, cfg2 = load_steering(tmp_path / "ckpt")
    assert cfg2 == cfg
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not list(tmp_path.glob(".*tmp"))  # nothing left behind
    with pytest.raises(ValueError, match="hidden size 10 .* model's hidden size is 12"):
        check_compatible(cfg2, hidden_size=12, n_layers=4)
    with pytest.raises(ValueError, match="does not match the module"):
        save_steering(module, SteeringConfig(["a"], 1, D, "tiny"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["hidden_size"] = 11
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match config.json"):
        load_steering(tmp_path / "ckpt")


def test_raw_units_is_the_same_function() -> None:
    module, s = _module(6), 37.0
    a = torch.randn(4, D) * s
    steered_scaled, g1 = module(a / s)
    raw = to_raw_units(module, s)
    steered_raw, g2 = raw(a)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(steered_scaled * s, steered_raw, rtol=1e-4, atol=1e-4)


def test_auroc_neg_is_positive_class() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def _synthetic(seed: int, n: int = 40) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(T, D, generator=g) * 3

    def split(m):
        return {f"a{t}": PosNeg(torch.randn(m, D, generator=g) + 5,
                                torch.randn(m, D, generator=g) + 5 + shift[t]) for t in range(T)}

    return split(n), split(n // 2)


def seed_objective(epochs: int) -> TrainConfig:
    """The published objective ("seed": random gates, one RBF bandwidth, equal MMD weights)."""
    return TrainConfig(lr=1e-3, batch_size=24, epochs=epochs, sigma=2.0,
                       weights=LossWeights(1.0, 0.9, 0.1, 0.9, gate=0.0),
                       scale="median_distance", patience=0, init_scale=0.01, seed=3,
                       objective="seed", bandwidths=(0.5, 1.0, 2.0), gate_init="random",
                       probe_cs=(0.01, 0.1, 1.0, 10.0), mmd_weighting="equal", gate_target=None)


def test_training_is_deterministic_and_picks_best_dev_epoch() -> None:
    train, dev = _synthetic(7)
    cfg = seed_objective(epochs=4)
    r1 = train_mat_steer(train, dev, cfg)
    r2 = train_mat_steer(train, dev, cfg)
    for k, v in r1.module.state_dict().items():
        assert torch.equal(v, r2.module.state_dict()[k])
    dev_losses = [h["dev/loss/total"] for h in r1.history]
    assert r1.best_epoch == int(np.argmin(dev_losses)) and r1.epochs_run == 4
    assert {"train/mmd", "dev/a0/gate_auroc", "dev/a2/mmd_after"} <= set(r1.history[0])


def test_stacked_gather_equals_advanced_indexing() -> None:
    g = torch.Generator().manual_seed(5)
    data = {f"a{t}": PosNeg(torch.randn(7 + t, D, generator=g), torch.randn(9 - t, D, generator=g))
            for t in range(T)}  # unequal counts: padded rows must never be picked
    stacked = Stacked(data)
    pos_i, neg_i, _ = stacked.sample(4, 5, torch.Generator().manual_seed(0))  # [4, T, 5]
    for which, idx, kind in ((stacked.pos, pos_i, "pos"), (stacked.neg, neg_i, "neg")):
        got = stacked.gather(which, idx)  # [4, T, 5, D]
        assert torch.equal(got, which[torch.arange(T).unsqueeze(1), idx])
        for b, t in itertools.product(range(4), range(T)):
            assert torch.equal(got[b, t], getattr(data[f"a{t}"], kind)[idx[b, t]])


def test_training_runs_on_train_threads_and_restores_the_callers() -> None:
    train, dev = _synthetic(7)
    cfg = seed_objective(epochs=2)
    before = torch.get_num_threads()
    seen = []
    r1 = train_mat_steer(train, dev, cfg, on_epoch=lambda *_: seen.append(torch.get_num_threads()))
    assert torch.get_num_threads() == before and seen == [before, before]
    torch.set_num_threads(1 if before > 1 else 2)  # the caller's thread count does not matter
    try:
        r2 = train_mat_steer(train, dev, cfg)
    finally:
        torch.set_num_threads(before)
    for k, v in r1.module.state_dict().items():
        assert torch.equal(v, r2.module.state_dict()[k])


def test_attribute_without_negatives_is_one_clear_error() -> None:
    acts = {"x": np.zeros((4, D), np.float32), "y": np.zeros((4, D), np.float32)}
    labels = {"x": np.array(["pos", "neg", "pos", "neg"]), "y": np.array(["pos"] * 4)}
    splits = {"x": np.array(["train"] * 4), "y": np.array(["train"] * 4)}
    with pytest.raises(ValueError, match="'y' has no negative examples in the train split"):
        split_pos_neg(acts, labels, splits, "train")
