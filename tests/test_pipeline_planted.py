"""End to end on a tiny MoE whose routers are planted: tokens of marked words in unsafe prompts go
to expert 0 of every layer, marked words of safe prompts to expert 1. Capture -> risk_diff ->
select_experts must recover exactly those experts, and risk_diff must equal a per-token loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import finish_model, tiny_moe_config
from transformers import Qwen2MoeForCausalLM

from steerline.backends.hf import TransformersBackend
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.detection.select_experts import select_experts
from steerline.steermoe.routing.capture import CaptureConfig, run_capture

UNSAFE_WORDS = [" bomb", " poison", " weapon"]
SAFE_WORDS = [" garden", " music", " bread"]
FILLER = [" the", " about", " please", " tell", " me", " how", " a", " to", " of", " it"]


def single_token_ids(tokenizer, words):
    ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def plant(model, unsafe_ids, safe_ids):
    """Residual stream = embeddings (attention and FFN outputs zeroed); dimension 0 of the
    embedding is +8 for unsafe words, -8 for safe words, 0 otherwise; router row 0 (1) reads
    +dim 0 (-dim 0), so those tokens always pick expert 0 (1)."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[unsafe_ids, 0] = 8.0
        emb[safe_ids, 0] = -8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.shared_expert.down_proj.weight.zero_()
            gate = layer.mlp.gate.weight  # [E, H]
            gate.normal_(0, 0.3)
            gate[:, 0] = 0.0
            gate[0, 0], gate[1, 0] = 5.0, -5.0


def make_prompts(n_per_label: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in (("unsafe", UNSAFE_WORDS), ("safe", SAFE_WORDS)):
        for i in range(n_per_label):
            toks = list(rng.choice(FILLER, 6)) + list(rng.choice(words, 2))
            rng.shuffle(toks)
            rows.append((f"{label}-{i:03d}", "".join(toks).strip(), label))
    return pd.DataFrame(rows, columns=["prompt_id", "text", "label"])


def loop_reference(routing_dir, n_layers, top_k, n_experts, scope):
    """Plain per-token loop over the routing rows: counts a[label][layer][expert], n[label]."""
    a = {lab: np.zeros((n_layers, n_experts), dtype=np.int64) for lab in ("safe", "unsafe")}
    n = {"safe": 0, "unsafe": 0}
    for shard in sorted(routing_dir.glob("*.parquet")):
        for row in pd.read_parquet(shard).itertuples():
            if scope == "user" and (row.is_generated or row.is_template):
                continue
            if scope == "generated" and not row.is_generated:
                continue
            n[row.label] += 1
            for layer in range(n_layers):
                for e in row.experts[layer * top_k : (layer + 1) * top_k]:
                    a[row.label][layer, e] += 1
    return a, n


@pytest.fixture(scope="module")
def planted_routing(tokenizer, tmp_path_factory):
    # top_k = 1: with k > 1 a planted expert displaces a token-specific second choice, which is a
    # real (and detected) routing difference but not a planted one.
    torch.manual_seed(0)
    cfg = tiny_moe_config(len(tokenizer), num_experts_per_tok=1)
    model = finish_model(Qwen2MoeForCausalLM(cfg), tokenizer)
    plant(model, single_token_ids(tokenizer, UNSAFE_WORDS), single_token_ids(tokenizer, SAFE_WORDS))
    tmp = tmp_path_factory.mktemp("planted")
    backend = TransformersBackend(model, tokenizer, batch_size=8)
    meta = {"model": "tiny-planted", "model_fingerprint": "tiny-planted-0"}
    run_capture(backend, tokenizer, make_prompts(24), CaptureConfig(4, 16), tmp / "routing",
                tmp / "gen.parquet", tmp / "cache", meta)
    return tmp / "routing"


@pytest.mark.parametrize("scope", ["user", "all", "generated"])
def test_risk_diff_equals_per_token_loop(planted_routing, scope):
    df, meta = compute_risk_diff(planted_routing, token_scope=scope, n_permutations=0)
    assert meta["token_scope"] == scope
    a, n = loop_reference(planted_routing, n_layers=3, top_k=1, n_experts=8, scope=scope)
    df = df.sort_values(["layer", "expert"])
    assert (df["a_unsafe"].to_numpy() == a["unsafe"].ravel()).all()
    assert (df["a_safe"].to_numpy() == a["safe"].ravel()).all()
    assert (df["n_unsafe"] == n["unsafe"]).all() and (df["n_safe"] == n["safe"]).all()
    expected = a["unsafe"].ravel() / n["unsafe"] - a["safe"].ravel() / n["safe"]
    assert np.array_equal(df["risk_diff"].to_numpy(), expected)


def test_planted_experts_recovered(planted_routing):
    df, meta = compute_risk_diff(planted_routing, token_scope="user", n_permutations=200, seed=0)
    sel = select_experts(df, threshold=0.1, top_k=50, alpha=0.05, require="pooled", meta=meta)
    assert sorted(map(tuple, sel["unsafe"])) == [(layer, 0) for layer in range(3)]
    assert sorted(map(tuple, sel["safe"])) == [(layer, 1) for layer in range(3)]
    planted = df[df["expert"] == 0]
    # every prompt carries the signal: significant at token and at prompt level alike
    assert (planted["q_token_z"] < 0.05).all() and (planted["q_perm"] < 0.05).all()
    assert float(meta["null_threshold"]) < planted["risk_diff"].min()
    # The ~30 chat-template tokens every prompt shares dilute the same signal under scope "all".
    df_all, _ = compute_risk_diff(planted_routing, token_scope="all", n_permutations=0)
    assert df_all[df_all["expert"] == 0]["risk_diff"].max() < 0.5 * planted["risk_diff"].min()
