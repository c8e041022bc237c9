"""vLLM on an NVIDIA GPU (marker `gpu`; skipped without CUDA, run by scripts/gpu_check.sh):
vLLM's own routed-experts capture against steerline's hooks, capture and steering on the tiny
families vLLM serves, and bf16 routers (the steering edit must stay float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import GPT_OSS_WINDOWED, build
from test_capture_dp import TEXTS, tiny64  # noqa: F401 (the fixture)
from test_families_vllm import assert_vllm_matches_and_steers

from steerline.backends import Steering, make_backend
from steerline.backends.vllm_native import native_unsupported
from steerline.core.chat import render_chat
from steerline.model.families import VLLM_FAMILIES, family_of
from steerline.steering.experts import SteeringPlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]
pytest.importorskip("vllm", reason="vLLM is installed by `make setup VLLM=gpu`")
MAX_NEW = 12
# tests/families.py names of the families vLLM serves on a GPU (model.families.VLLM_FAMILIES; the
# DeepSeek ones and GPT-OSS / Granite-MoE added by issue 24, never run: no GPU was lent). Phi-MoE
# saved by transformers 5 is refused everywhere (vLLM's Transformers fallback fails).
SERVED = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "granitemoe", "deepseek_v2",
          "deepseek_v3")


def expert_sets(r, k: int) -> np.ndarray:
    """[tokens, layers, k] ids sorted within each top-k (order inside a top-k is free)."""
    return np.sort(r.experts.reshape(len(r.token_ids), -1, k), axis=-1)


def saved_family(name: str, tokenizer, out) -> str:
    """The tiny checkpoint of family `name`, saved as vLLM serves it: untied where vLLM's model
    never ties lm_head (OLMoE, GPT-OSS, DeepSeek: check_vllm_family refuses tied ones),
    GPT-OSS with vLLM's layer pattern, DeepSeek-V3 with the keys vLLM reads its routing from."""
    untie = dict(tie_word_embeddings=False) if name in ("olmoe", "gpt_oss", "deepseek_v2",
                                                         "deepseek_v3") else {}
    config = GPT_OSS_WINDOWED if name == "gpt_oss" else None
    model = build(name, vocab=len(tokenizer), config=config, **untie)
    assert family_of(model.config).name in VLLM_FAMILIES
    if name == "deepseek_v3":
        model.config.topk_method, model.config.scoring_func = "noaux_tc", "sigmoid"
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out / name)
    tokenizer.save_pretrained(out / name)
    return str(out / name)


def assert_native_equals_hooks(path: str, chats, max_new: int) -> None:
    """vLLM's own routed experts (Model Runner V2, `enable_return_routed_experts`) equal the
    hooks' ids (rule "engine": vLLM's own choice) on every token of every layer, same answers."""
    opts = dict(progress=False, routing_rule="engine", gpu_memory_utilization=0.3)
    with make_backend("vllm", path, capture="hooks", **opts) as hooks:
        ref = hooks.generate_and_capture(chats, max_new)
        k = hooks.top_k
    with make_backend("vllm", path, capture="auto", **opts) as native:
        assert native.native  # auto: CUDA + the engine option + rule "engine"
        got = native.generate_and_capture(chats, max_new)
        with pytest.raises(ValueError, match="capture='hooks'"):
            plan = SteeringPlan(activate=((native.moe_layers[0], 1),), delta=0.01)
            native.generate(chats[:1], 2, steering=Steering(plan))
    for a, b in zip(ref, got, strict=True):
        assert b.token_ids.tolist() == a.token_ids.tolist() and b.finished == a.finished
        assert np.array_equal(expert_sets(a, k), expert_sets(b, k))
        assert np.isnan(b.weights.astype(np.float32)).all()  # not returned by vLLM


def test_native_routed_experts_equal_the_hooks(tiny64, tokenizer):  # noqa: F811
    why = native_unsupported(True)
    if why is not None:
        pytest.skip(why)
    assert_native_equals_hooks(str(tiny64), [render_chat(tokenizer, t) for t in TEXTS], MAX_NEW)


@pytest.mark.parametrize("name", SERVED)
def test_native_routed_experts_equal_the_hooks_per_family(name, tokenizer, tmp_path):
    why = native_unsupported(True)
    if why is not None:
        pytest.skip(why)
    chats = [render_chat(tokenizer, t) for t in TEXTS[:4]]
    assert_native_equals_hooks(saved_family(name, tokenizer, tmp_path), chats, MAX_NEW)


@pytest.mark.parametrize("name", SERVED)
def test_vllm_hooks_capture_and_steer_each_family(name, tokenizer, tmp_path):
    chats = [render_chat(tokenizer, t) for t in TEXTS[:4]]
    assert_vllm_matches_and_steers(saved_family(name, tokenizer, tmp_path), chats, MAX_NEW,
                                   gpu_memory_utilization=0.3)


def test_bf16_routers_steer_and_capture(tiny64, tokenizer):  # noqa: F811
    """bf16 engine: the steering margin survives (the hook edits in float32) and the captured
    weights are finite probabilities."""
    chats = [render_chat(tokenizer, t) for t in TEXTS[:4]]
    with make_backend("vllm", str(tiny64), dtype="bfloat16", progress=False,
                      gpu_memory_utilization=0.3) as vb:
        plain = vb.generate_and_capture(chats, MAX_NEW)
        plan = SteeringPlan(activate=((2, 5),), deactivate=((2, 6),), delta=0.01)
        steered = vb.generate_and_capture(chats, MAX_NEW, steering=Steering(plan))
    for r in plain:
        w = r.weights.astype(np.float32)
        assert np.isfinite(w).all() and (w > 0).all() and (w <= 1).all()
    for r in steered:
        block = r.experts.reshape(len(r.token_ids), -1, 2)[:, 2]
        assert (block == 5).any(-1).all() and not (block == 6).any()
