"""Inference-time expert steering: the SteerMoE rule on tiny random Qwen2-MoE, Qwen3-MoE,
Mixtral and OLMoE models, exactness of the no-op plan, batching, and bad inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import tiny_moe_config
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from steerline.core.chat import render_chat
from steerline.model.arch import DenseModelError, find_routers
from steerline.model.families import RouterRule, steer_scores
from steerline.steering.capture import RoutingRecorder, generate_routed_all
from steerline.steering.experts import (
    SteeringPlan,
    check_experts,
    expert_steering,
    make_router_hook,
    plan_from_experts,
    ranked_from_risk_diff,
)

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2)


def _randomize_routers(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for site in find_routers(model):
            site.module.weight.normal_(0, 1.0)
    return model.eval()


def qwen2():
    torch.manual_seed(0)
    return _randomize_routers(Qwen2MoeForCausalLM(tiny_moe_config(VOCAB, num_hidden_layers=2)))


def qwen3():
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=8, num_experts=8,
                         norm_topk_prob=True, head_dim=8)
    return _randomize_routers(Qwen3MoeForCausalLM(cfg))


def mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8)
    return _randomize_routers(MixtralForCausalLM(cfg))


def olmoe():
    torch.manual_seed(0)
    cfg = OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8)  # norm_topk_prob False
    return _randomize_routers(OlmoeForCausalLM(cfg))


ARCHS = {"qwen2_moe": qwen2, "qwen3_moe": qwen3, "mixtral": mixtral, "olmoe": olmoe}


def batch(b: int = 3, t: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    return ids, mask


@torch.no_grad()
def routed_ids(model, ids, mask) -> torch.Tensor:
    """Top-k ids per layer [B*T, L, k] as the experts see them (recorded after any steering)."""
    rec = RoutingRecorder(model)
    with rec.recording():
        model(input_ids=ids, attention_mask=mask)
        got, _ = rec.collect(ids.shape[0], ids.shape[1])
    return got.reshape(ids.numel(), len(rec.sites), rec.top_k)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_activated_in_every_topk_deactivated_in_none(arch):
    model = ARCHS[arch]()
    ids, mask = batch()
    plain = routed_ids(model, ids, mask)
    # pick experts the plain model routes to sometimes-but-not-always, so the check has teeth
    counts = torch.stack([(plain[:, 0] == e).any(-1).float().mean() for e in range(8)])
    rare = int(counts.argmin())  # activate the least used expert of layer 0
    common = int(counts.argmax())  # deactivate the most used one
    assert counts[rare] < 1.0 and counts[common] > 0.0
    plan = SteeringPlan(activate=((0, rare), (1, 3)), deactivate=((0, common), (1, 5), (1, 6)),
                        delta=0.01)
    with expert_steering(model, plan):
        got = routed_ids(model, ids, mask)
    assert (got[:, 0] == rare).any(-1).all()
    assert not (got[:, 0] == common).any()
    assert (got[:, 1] == 3).any(-1).all()
    assert not ((got[:, 1] == 5) | (got[:, 1] == 6)).any()
    # hook removed on exit: routing is the plain model's again
    assert torch.equal(routed_ids(model, ids, mask), plain)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_weights_follow_modified_scores(arch):
    """Top-k ids and weights equal softmax -> top-k (-> renormalise) of the SteerMoE scores."""
    model = ARCHS[arch]()
    site = find_routers(model)[0].module
    captured = {}
    site.register_forward_hook(lambda m, a, o: captured.__setitem__("out", o))
    x = torch.randn(13, model.config.hidden_size)
    with torch.no_grad():
        logits = site(x)[0]
        plan = SteeringPlan(activate=((0, 2),), deactivate=((0, 0), (0, 7)), delta=0.01)
        with expert_steering(model, plan):
            site(x)
    scores, weights, ids = captured["out"]
    ref = torch.log_softmax(logits.float(), -1)
    ref[:, 2] = ref.max(-1).values + 0.01
    lo = torch.log_softmax(logits.float(), -1).min(-1).values - 0.01
    ref[:, 0], ref[:, 7] = lo, lo
    torch.testing.assert_close(scores.float(), ref, rtol=0, atol=1e-6)
    w_ref, i_ref = torch.softmax(ref, -1).topk(2, -1)
    norm = getattr(model.config, "norm_topk_prob", True)
    if norm:
        w_ref = w_ref / w_ref.sum(-1, keepdim=True)
    assert torch.equal(ids, i_ref)
    torch.testing.assert_close(weights.float(), w_ref, rtol=0, atol=1e-6)


def test_empty_plan_is_bit_identical(tiny_moe):
    ids, mask = batch()
    ids = ids % tiny_moe.config.vocab_size
    with torch.no_grad():
        plain = tiny_moe(input_ids=ids, attention_mask=mask).logits
        with expert_steering(tiny_moe, SteeringPlan()):
            steered = tiny_moe(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, steered)


def test_hook_removed_on_error(tiny_moe):
    plan = SteeringPlan(deactivate=((0, 1),), delta=0.01)
    with pytest.raises(RuntimeError, match="boom"), expert_steering(tiny_moe, plan):
        raise RuntimeError("boom")
    assert all(not s.module._forward_hooks for s in find_routers(tiny_moe))


def test_steered_generation_batch_n_equals_batch_1(tiny_moe, tokenizer):
    texts = ["How can I kill a Python process?", "Write a poem about the sea.", "What is 2+2?",
             "Give me three tips for sleeping better"]
    chats = [render_chat(tokenizer, t) for t in texts]
    pad = tokenizer.pad_token_id
    plan = SteeringPlan(activate=((0, 3), (2, 5)), deactivate=((1, 0), (1, 1), (2, 7)), delta=0.01)
    with expert_steering(tiny_moe, plan):
        batched = generate_routed_all(tiny_moe, chats, 8, pad, batch_size=len(chats))
        single = generate_routed_all(tiny_moe, chats, 8, pad, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert (a.experts == b.experts).all()
        ex = a.experts.reshape(len(a.experts), 3, 2)  # [n, L, k]
        assert (ex[:, 0] == 3).any(-1).all() and (ex[:, 2] == 5).any(-1).all()
        assert not (ex[:, 1] <= 1).any() and not (ex[:, 2] == 7).any()


def test_plain_linear_gate_returns_modified_logits():
    """Older blocks (a Linear gate returning logits; the block does softmax + top-k itself)."""
    torch.manual_seed(0)
    gate = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    x = torch.randn(40, 16, dtype=torch.bfloat16)
    gate.register_forward_hook(
        make_router_hook([4], [0, 1], 0.01, RouterRule("softmax_topk", top_k=2)))
    out = gate(x)
    assert out.dtype == torch.float32  # bf16 would round a 0.01 margin away
    top = torch.softmax(out, -1).topk(2, -1).indices
    assert (top == 4).any(-1).all() and not (top <= 1).any()


def test_steer_scores_rule():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    s = steer_scores(logits, torch.tensor([0]), torch.tensor([3]), 0.5)
    base = torch.log_softmax(logits, -1)[0]
    assert torch.allclose(s[0, 0], base.max() + 0.5)
    assert torch.allclose(s[0, 3], base.min() - 0.5)
    assert torch.equal(s[0, 1:3], base[1:3])


def test_dense_model_rejected(tiny_dense):
    with pytest.raises(DenseModelError, match="dense model"):
        with expert_steering(tiny_dense, SteeringPlan(deactivate=((0, 1),), delta=0.01)):
            pass


@pytest.mark.parametrize(
    "plan, match",
    [
        (SteeringPlan(deactivate=((0, 8),), delta=0.01), "out of range"),
        (SteeringPlan(deactivate=((3, 0),), delta=0.01), "layer 3"),
        (SteeringPlan(activate=((0, 1), (0, 2), (0, 3)), delta=0.01), "only top_k=2"),
        (SteeringPlan(deactivate=tuple((0, e) for e in range(7)), delta=0.01), "fewer than top_k"),
        (SteeringPlan(activate=((1, 2),), deactivate=((1, 2),), delta=0.01), "both activated"),
        (SteeringPlan(activate=((1, 2), (1, 2)), delta=0.01), "listed twice"),
        (SteeringPlan(activate=((1, 2),), delta=0.0), "positive"),
        (SteeringPlan(activate=((1, 2),)), "delta must be a positive finite number, got None"),
    ],
)
def test_bad_plans_fail_before_hooking(tiny_moe, plan, match):
    with pytest.raises(ValueError, match=match):
        with expert_steering(tiny_moe, plan):
            pass
    assert all(not s.module._forward_hooks for s in find_routers(tiny_moe))


def test_check_experts_rejects_malformed():
    with pytest.raises(ValueError, match="two ints"):
        check_experts([[1, 2, 3]], 4, 8, "x")
    with pytest.raises(ValueError, match="two ints"):
        check_experts([["1", 2]], 4, 8, "x")


def risk_frame() -> pd.DataFrame:
    rows = [(layer, e, (layer * 8 + e - 12) / 100) for layer in range(3) for e in range(8)]
    return pd.DataFrame(rows, columns=["layer", "expert", "risk_diff"])


def test_plan_from_experts_modes_caps_and_fallback():
    sel = {"unsafe": [[2, 7], [2, 6], [2, 5], [2, 4], [2, 3], [2, 2], [2, 1], [1, 0]],
           "safe": [[0, 0], [0, 1], [0, 2], [1, 1]]}
    plan = plan_from_experts(sel, "deactivate_unsafe", 3, 0.01, 3, 8, 2)
    assert plan.deactivate == ((2, 7), (2, 6), (2, 5)) and not plan.activate
    # at most E - k = 6 deactivated in layer 2: the 7th is skipped, the next layer's taken
    plan = plan_from_experts(sel, "deactivate_unsafe", 50, 0.01, 3, 8, 2)
    assert len(plan.deactivate) == 7 and (2, 1) not in plan.deactivate
    # at most k = 2 activated in layer 0
    plan = plan_from_experts(sel, "activate_safe", 50, 0.01, 3, 8, 2)
    assert plan.activate == ((0, 0), (0, 1), (1, 1))
    plan = plan_from_experts(sel, "both", 2, 0.01, 3, 8, 2)
    assert plan.activate == ((0, 0), (0, 1)) and plan.deactivate == ((2, 7), (2, 6))
    # empty unsafe list: the risk_diff ranking, regardless of q-value
    empty = {"unsafe": [], "safe": []}
    plan = plan_from_experts(empty, "deactivate_unsafe", 2, 0.01, 3, 8, 2, risk_frame())
    assert plan.deactivate == ((2, 7), (2, 6)) and plan.source["deactivate"] == "risk_diff_fallback"
    assert ranked_from_risk_diff(risk_frame(), "safe")[0] == (0, 0)
    with pytest.raises(ValueError, match="no unsafe experts"):
        plan_from_experts(empty, "deactivate_unsafe", 2, 0.01, 3, 8, 2)
    with pytest.raises(ValueError, match="out of range"):
        plan_from_experts({"unsafe": [[0, 99]], "safe": []}, "deactivate_unsafe", 2, 0.01, 3, 8,
                          2)
