"""vLLM backend against the transformers reference on a real MoE (slow: one engine per module).

The MoE is a quick MoEfication of the real default model (conftest `real_moe`): near-uniform
routers (logit std ~1e-3), so float ties between backends show up if they are mishandled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import freeze_heap

from steerline import numerics
from steerline.backends import ActivationSteering, Steering, eos_token_ids, make_backend
from steerline.backends.compare import compare_runs
from steerline.backends.hf import TransformersBackend
from steerline.core.chat import render_chat
from steerline.steering.experts import SteeringPlan
from steerline.steering.gated import SteeringModule
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.schema import ROUTING_SCHEMA

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (VLLM=cpu by default)")

TEXTS = [
    "What is the capital of France?", "How can I kill a Python process?",
    "Write a haiku about rain.", "How do I make a bomb?", "What is 2+2?",
    "Give me three tips for sleeping better.", "Explain photosynthesis in one sentence.",
    "How do I pick a lock?", "Translate 'good morning' into Spanish.",
    "What should I do if I feel sad?", "Name a prime number larger than 10.",
    "How can I steal a car?", "Say hello.", "Who wrote Hamlet?",
    "Describe the colour blue to someone who cannot see.", "How do I bake bread?",
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def setup(real_moe, real_moe_dir):
    _, moe, tok, _ = real_moe
    chats = [render_chat(tok, t) for t in TEXTS]
    hf = TransformersBackend(moe, tok, batch_size=16)
    freeze_heap()
    with make_backend("vllm", str(real_moe_dir), progress=False) as vb:
        yield hf, vb, chats, tok


@pytest.fixture(scope="module")
def plain(setup):
    hf, vb, chats, _ = setup
    return hf.generate_and_capture(chats, MAX_NEW), vb.generate_and_capture(chats, MAX_NEW)


def test_vllm_greedy_answers_and_routing_match_transformers(setup, plain, real_moe_dir):
    hf, vb, _, tok = setup
    ref, got = plain
    assert eos_token_ids(real_moe_dir) == [tok.convert_tokens_to_ids("<|im_end|>")]
    c = compare_runs(ref, got, vb.top_k, hf.model)
    print(f"vLLM vs transformers: {c.identical}/{len(ref)} identical answers, {c.tie_splits} "
          f"split at a float tie, top-k agreement {c.topk_agreement:.5f}")
    assert c.agree and c.identical >= len(ref) - 1
    for a, b in zip(ref, got, strict=True):
        if a.token_ids.tolist() == b.token_ids.tolist():
            assert b.finished == a.finished and b.is_template.tolist() == a.is_template.tolist()
            assert np.abs(a.weights.astype(np.float32) - b.weights.astype(np.float32)).max() < 1e-2
    assert any(r.finished for r in got)  # stops at <|im_end|> where transformers does
    # Plain generation (no capture) gives the same answers.
    gen = vb.generate(setup[2], MAX_NEW)
    assert [g.token_ids.tolist() for g in gen] == [r.token_ids[r.n_prompt:].tolist() for r in got]
    assert vb._rpc("steerline_info")["hooks"] == 0  # removed after every call


def test_zero_steering_is_plain_vllm(setup, plain):
    _, vb, chats, _ = setup
    zero = Steering(SteeringPlan(), ActivationSteering(10, vector=torch.zeros(576)))
    got = vb.generate_and_capture(chats, MAX_NEW, steering=zero)
    for a, b in zip(plain[1], got, strict=True):
        assert b.token_ids.tolist() == a.token_ids.tolist()
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.weights, b.weights)


def test_expert_steering_per_request_matches_transformers(setup, plain):
    hf, vb, chats, _ = setup
    k = vb.top_k
    plan = SteeringPlan(activate=((0, 3), (5, 7), (29, 1)), deactivate=((0, 4), (12, 0)),
                        delta=0.01)
    steer = Steering(plan)
    mixed = [steer if i % 2 == 0 else None for i in range(len(chats))]
    got = vb.generate_and_capture(chats, MAX_NEW, steering=mixed)
    ref = hf.generate_and_capture(chats, MAX_NEW, steering=mixed)
    for i, b in enumerate(got):
        sets = b.experts.reshape(len(b.token_ids), -1, k)
        if i % 2 == 0:  # steered: every token's top-k obeys the plan
            for layer, expert in plan.activate:
                assert (sets[:, layer] == expert).any(-1).all()
            for layer, expert in plan.deactivate:
                assert not (sets[:, layer] == expert).any()
        else:  # unsteered requests in the same batch are untouched
            assert b.token_ids.tolist() == plain[1][i].token_ids.tolist()
            assert np.array_equal(b.experts, plain[1][i].experts)
    c = compare_runs(ref, got, k)  # no tie check: the reference would need the same hooks
    assert c.topk_agreement >= 0.995 and c.identical >= len(ref) - 1


def test_mat_steer_activation_steering_matches_transformers(setup):
    hf, vb, chats, _ = setup
    module = SteeringModule(576, 2, init_scale=3.0, generator=torch.Generator().manual_seed(0))
    steer = Steering(activation=ActivationSteering(12, module=module))
    ref = hf.generate(chats[:8], MAX_NEW, steering=steer)
    got = vb.generate(chats[:8], MAX_NEW, steering=steer)
    plain = vb.generate(chats[:8], MAX_NEW)
    n_equal = sum(g.token_ids.tolist() == r.token_ids.tolist()
                  for g, r in zip(got, ref, strict=True))
    assert n_equal >= len(ref) - 1
    assert [g.token_ids.tolist() for g in got] != [p.token_ids.tolist() for p in plain]


def test_capture_stage_writes_contract_with_backend(setup, tmp_path):
    _, vb, _, tok = setup
    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(4)], "text": TEXTS[:4],
                       "label": ["safe", "unsafe", "safe", "unsafe"]})
    gens = run_capture(vb, tok, df, CaptureConfig(6, 3), tmp_path / "r", tmp_path / "g.parquet",
                       tmp_path / "c", {"model": "real", "model_fingerprint": "real-0"})
    shards = sorted((tmp_path / "r").glob("*.parquet"))
    assert len(shards) == 2 and len(gens) == 4
    schema = pq.read_schema(shards[0])
    assert schema.remove_metadata().equals(ROUTING_SCHEMA)
    assert schema.metadata[b"backend"] == b"vllm" and schema.metadata[b"n_layers"] == b"30"


def test_vllm_runs_its_avx2_kernels_under_the_numerics_contract(setup):
    """vLLM picks its kernel library from the CPU it finds (AVX-512 / AMX paths on recent Intel):
    under steerline's contract it loads the AVX2 one, as on any other x86-64 CPU."""
    if numerics.native() or torch.backends.cpu.get_cpu_capability() != "AVX2":
        pytest.skip("numerics contract off, or no AVX2")
    maps = Path("/proc/self/maps").read_text()
    loaded = {lib for lib in ("_C.abi3.so", "_C_AVX2.abi3.so", "_C_AVX512.abi3.so")
              if f"/vllm/{lib}" in maps}
    assert loaded == {"_C_AVX2.abi3.so"}
