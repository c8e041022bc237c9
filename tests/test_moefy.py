"""MoEfication: exact dense equivalence at top_k = n_experts, balanced experts, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steerline.model.gguf import save_model
from steerline.model.moefy import (
    MoeSpec,
    balanced_groups,
    fidelity,
    moefy,
    principal_coordinates,
)


def random_seqs(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


@pytest.mark.parametrize("refit", [0.0, 0.01])
def test_all_experts_active_reproduces_dense(tiny_dense, refit):
    seqs = random_seqs(tiny_dense.config.vocab_size, 8, 12)
    spec = MoeSpec(n_experts=4, top_k=4, shared_fraction=0.25, router_tau=1e-6,
                   refit_lambda=refit)
    moe = moefy(tiny_dense, seqs, spec, max_tokens=80)
    ids = torch.tensor(random_seqs(tiny_dense.config.vocab_size, 2, 10, seed=1))
    with torch.no_grad():
        dense_logits = tiny_dense(input_ids=ids).logits
        moe_logits = moe(input_ids=ids).logits
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-4, rtol=1e-4)
    assert fidelity(tiny_dense, moe, seqs[:2])["top1_agreement"] == 1.0


def test_partial_routing_keeps_shape_and_active_fraction(tiny_dense):
    seqs = random_seqs(tiny_dense.config.vocab_size, 8, 12)
    spec = MoeSpec(n_experts=4, top_k=2, shared_fraction=0.5, refit_lambda=0.01)
    assert spec.active_fraction(64) == 0.75
    moe = moefy(tiny_dense, seqs, spec, max_tokens=90)
    mlp = moe.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape == (4, 2 * 8, 32)
    assert mlp.shared_expert.down_proj.weight.shape == (32, 32)
    out = fidelity(tiny_dense, moe, seqs[:4])
    assert 0.0 <= out["top1_agreement"] <= 1.0 and out["mean_kl"] >= 0.0


def test_balanced_groups_equal_sizes():
    rng = np.random.default_rng(0)
    prof = rng.normal(size=(96, 200))
    assign = balanced_groups(prof, 8, seed=0)
    assert sorted(np.bincount(assign).tolist()) == [12] * 8


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)])
def test_principal_coordinates_match_svd(shape):
    rng = np.random.default_rng(1)
    prof = rng.normal(size=shape).astype(np.float32)
    got = principal_coordinates(prof, 64)
    assert got.dtype == np.float32 and got.shape == (shape[0], 64)
    u, s, _ = np.linalg.svd(prof.astype(np.float64), full_matrices=False)
    ref = u[:, :64] * s[:64]
    # the sign convention: each column's largest-magnitude entry is positive
    ref *= np.sign(ref[np.argmax(np.abs(ref), axis=0), np.arange(64)])
    assert (got[np.argmax(np.abs(got), axis=0), np.arange(64)] > 0).all()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # k-means and the assignment see only distances: a sign convention changes no group
    signs = np.where(rng.random(64) < 0.5, -1.0, 1.0).astype(np.float32)
    assert np.array_equal(balanced_groups(got, 8, seed=0), balanced_groups(got * signs, 8, seed=0))


def test_saved_moe_loads_unmodified(tiny_dense, tokenizer, tmp_path):
    seqs = random_seqs(tiny_dense.config.vocab_size, 6, 10)
    moe = moefy(tiny_dense, seqs, MoeSpec(4, 2, 0.5, refit_lambda=0.01), max_tokens=60)
    save_model(moe, tokenizer, tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor(seqs[:2])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, moe(input_ids=ids).logits)


def test_spec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="top_k"):
        MoeSpec(4, 5, 0.5).sizes(64)
