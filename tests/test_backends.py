"""The backend interface on tiny models (fast): the transformers backend reuses the project's
steering rules exactly, per-request steering, the wire form sent to vLLM workers, the routing
rule that aligns vLLM with transformers on float ties, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from steerline.backends import ActivationSteering, Steering, make_backend
from steerline.backends.compare import compare_runs, split_at
from steerline.backends.hf import TransformersBackend
from steerline.backends.vllm_worker import enforce_topk
from steerline.core.chat import render_chat
from steerline.core.params import CaptureRouting, load_params
from steerline.model.arch import DenseModelError, router_topk
from steerline.model.families import RouterRule, select
from steerline.steering.capture import Routed, generate_routed_all
from steerline.steering.experts import SteeringPlan, expert_steering
from steerline.steering.gated import SteeringModule
from steerline.steering.request import per_prompt
from steerline.steering.residual import steering_hook
from steerline.steermoe.routing.capture import CaptureConfig, run_capture

TEXTS = ["How can I kill a Python process?", "Write a poem about the sea.", "What is 2+2?",
         "Give me three tips for sleeping better"]
PLAN = SteeringPlan(activate=((0, 1), (2, 5)), deactivate=((1, 3),), delta=0.01)


def module(hidden: int, seed: int = 0) -> SteeringModule:
    return SteeringModule(hidden, 2, init_scale=1.0, generator=torch.Generator().manual_seed(seed))


def same(a, b) -> bool:
    return all(x.token_ids.tolist() == y.token_ids.tolist() and np.array_equal(x.experts, y.experts)
               and np.array_equal(x.weights, y.weights) for x, y in zip(a, b, strict=True))


@pytest.fixture()
def setup(tiny_moe, tokenizer):
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    return TransformersBackend(tiny_moe, tokenizer, batch_size=4), chats


def test_expert_steering_is_the_expert_steering_rule(setup, tiny_moe, tokenizer):
    backend, chats = setup
    got = backend.generate_and_capture(chats, 6, steering=Steering(PLAN))
    with expert_steering(tiny_moe, PLAN):
        ref = generate_routed_all(tiny_moe, chats, 6, tokenizer.pad_token_id, 4)
    assert same(got, ref)
    sets = np.stack([r.experts.reshape(len(r.token_ids), 3, 2)[0] for r in got])
    assert (sets[:, 0] == 1).any(-1).all() and not (sets[:, 1] == 3).any()
    assert not tiny_moe.model.layers[0].mlp.gate._forward_hooks  # removed afterwards


def test_activation_steering_is_the_mat_steer_hook(setup, tiny_moe, tokenizer):
    backend, chats = setup
    mod = module(32)
    got = backend.generate_and_capture(chats, 6, Steering(activation=ActivationSteering(1, mod)))
    with steering_hook(tiny_moe, 1, mod.steer):
        ref = generate_routed_all(tiny_moe, chats, 6, tokenizer.pad_token_id, 4)
    assert same(got, ref)
    assert not same(got, backend.generate_and_capture(chats, 6))


def test_per_request_steering_equals_separate_runs(setup):
    backend, chats = setup
    steer = Steering(PLAN, ActivationSteering(0, vector=torch.full((32,), 0.5)))
    mixed = backend.generate_and_capture(chats, 6, [steer, None, steer, None])
    alone = backend.generate_and_capture(chats, 6, steer)
    plain = backend.generate_and_capture(chats, 6)
    assert same(mixed[0::2], alone[0::2]) and same(mixed[1::2], plain[1::2])
    gen = backend.generate(chats, 6, [steer, None, steer, None])
    assert [g.token_ids.tolist() for g in gen] == [
        r.token_ids[r.n_prompt:].tolist() for r in mixed]


def test_zero_steering_is_plain(setup):
    backend, chats = setup
    zero = Steering(SteeringPlan(), ActivationSteering(1, vector=torch.zeros(32)))
    plain = backend.generate_and_capture(chats, 6)
    assert same(backend.generate_and_capture(chats, 6, zero), plain)


def test_dense_backend_generates_with_steering(tiny_dense, tokenizer):
    backend = TransformersBackend(tiny_dense, tokenizer, batch_size=2)
    chats = [render_chat(tokenizer, t) for t in TEXTS[:3]]
    plain = backend.generate(chats, 5)
    assert backend.n_layers == 0 and all(len(g.token_ids) == 5 or g.finished for g in plain)
    zero = backend.generate(chats, 5, Steering(activation=ActivationSteering(
        0, vector=torch.zeros(32))))
    assert [g.token_ids.tolist() for g in zero] == [g.token_ids.tolist() for g in plain]
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        backend.generate(chats, 5, Steering(PLAN))


def test_capture_rejects_a_dense_model(tiny_dense, tokenizer, tmp_path):
    backend = TransformersBackend(tiny_dense, tokenizer)
    df = pd.DataFrame({"prompt_id": ["a", "b"], "text": TEXTS[:2], "label": ["safe", "unsafe"]})
    with pytest.raises(DenseModelError, match="Mixture-of-Experts"):
        run_capture(backend, tokenizer, df, CaptureConfig(2, 2), tmp_path / "r",
                    tmp_path / "g.parquet", tmp_path / "c", {"model": "tiny"})
    assert not any(tmp_path.iterdir())


def test_wire_round_trip_keeps_the_plan():
    mod = module(16)
    steer = Steering(PLAN, ActivationSteering(3, mod))
    back = Steering.from_wire(steer.to_wire())
    assert back.plan_id == steer.plan_id and back.experts == PLAN
    for k, v in mod.state_dict().items():
        assert torch.equal(back.activation.module.state_dict()[k], v)
    add = Steering(activation=ActivationSteering(1, vector=torch.arange(4.0)))
    assert torch.equal(Steering.from_wire(add.to_wire()).activation.vector, torch.arange(4.0))
    assert Steering(PLAN).plan_id != steer.plan_id


def test_bad_steering_inputs(setup, tiny_moe):
    backend, chats = setup
    with pytest.raises(ValueError, match="exactly one"):
        ActivationSteering(0)
    with pytest.raises(ValueError, match="exactly one"):
        ActivationSteering(0, module(32), torch.zeros(32))
    with pytest.raises(ValueError, match="hidden size 16"):
        backend.generate(chats, 2, Steering(activation=ActivationSteering(0, module(16))))
    with pytest.raises(ValueError, match="names layer 7"):
        backend.generate(chats, 2, Steering(SteeringPlan(activate=((7, 0),), delta=0.01)))
    with pytest.raises(ValueError, match="2 steering requests for 4 prompts"):
        per_prompt([None, None], 4)
    for layer in tiny_moe.model.layers:  # nothing left behind by the failed calls
        assert not layer._forward_hooks and not layer.mlp.gate._forward_hooks
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tgi", "models/moe")
    with pytest.raises(FileNotFoundError, match="no/such/model not found"):
        make_backend("vllm", "no/such/model")
    with pytest.raises(ValidationError):
        repo = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
        CaptureRouting.model_validate({**repo.capture_routing.model_dump(), "backend": "tgi"})


def test_routing_rule_makes_the_engine_routing_pick_the_transformers_experts():
    # Near-uniform logits: distinct in float32, equal after the float32 softmax in most rows.
    gen = torch.Generator().manual_seed(0)
    logits = 1e-3 * torch.randn(512, 16, generator=gen)
    logits[:, 5] = logits[:, 9] = logits[:, 2] + 1e-9 * torch.rand(512, generator=gen)
    rule = RouterRule("softmax_topk", top_k=8, norm=True)
    _, ids, w = router_topk(logits, rule)
    fixed = enforce_topk(logits, ids)
    e_ids, e_w = select(fixed, rule, engine=True)
    assert torch.equal(e_ids.sort(-1).values, ids.sort(-1).values)
    assert torch.allclose(e_w.sort(-1).values, w.sort(-1).values, atol=1e-6)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    assert torch.equal(fixed[chosen], logits[chosen])  # chosen logits (the weights) untouched
    floor = torch.where(chosen, logits, torch.inf).amin(-1, keepdim=True)
    rows = ~(~chosen & (logits >= floor)).any(-1)  # no unchosen expert reaches the chosen ones
    assert 0 < int(rows.sum()) < len(rows)
    assert torch.equal(fixed[rows], logits[rows])  # rows without a tie: bit for bit


def _routed(tokens: list[int], experts: np.ndarray) -> Routed:
    n = len(tokens)
    return Routed(token_ids=np.asarray(tokens, np.int32), is_generated=np.zeros(n, bool),
                  is_template=np.zeros(n, bool), experts=experts.astype(np.int16),
                  weights=np.zeros(experts.shape, np.float16), n_prompt=n, n_generated=0,
                  finished=False)


def test_compare_runs_counts_splits_and_set_agreement():
    k = 2
    ex = np.array([[0, 1, 2, 3], [1, 0, 3, 2], [0, 2, 1, 3]])  # [n=3, L=2 * k]
    a = _routed([5, 6, 7], ex)
    b = _routed([5, 6, 7], ex[:, [1, 0, 3, 2]])  # same sets, other order: agree
    c = _routed([5, 6, 9], np.array([[0, 1, 2, 3], [1, 0, 2, 1], [0, 1, 2, 3]]))
    assert split_at(a, b) is None and split_at(a, c) == 2
    r = compare_runs([a, a], [b, c], k)
    # a vs b: 6 token-layers agree; a vs c: common prefix of 2 tokens, 1 of 4 differs
    assert r.identical == 1 and r.tie_splits == 0 and r.other_splits == 1
    assert r.topk_agreement == pytest.approx(9 / 10) and not r.agree
    assert compare_runs([a], [b], k).agree
