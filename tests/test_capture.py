"""Routing capture (transformers backend): exactness, batching, resume and bad inputs."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from steerline.backends.hf import TransformersBackend
from steerline.core.chat import render_chat
from steerline.core.io import sha256_file
from steerline.model.arch import DenseModelError, find_routers
from steerline.steering.capture import RoutingRecorder, generate_routed, generate_routed_all
from steerline.steermoe.routing.capture import CaptureConfig, run_capture

TEXTS = [
    "How can I kill a Python process?",
    "Write a poem about the sea and the wind at night.",
    "What is 2+2?",
    "Explain how vaccines train the immune system, briefly.",
    "Give me three tips for sleeping better",
]


TINY_META = {"model": "tiny", "model_fingerprint": "tiny-0"}


def prompts_frame(texts=TEXTS):
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(texts))],
            "text": texts,
            "label": ["unsafe" if i % 2 else "safe" for i in range(len(texts))],
        }
    )


@torch.no_grad()
def plain_topk(model, token_ids) -> torch.Tensor:
    """Top-k expert ids of every router from one plain forward over the full sequence [n, L*k]."""
    logits = {}
    sites = find_routers(model)
    handles = [
        s.module.register_forward_hook(lambda m, a, o, i=s.layer: logits.__setitem__(i, o[0]))
        for s in sites
    ]
    try:
        model(input_ids=torch.as_tensor(token_ids, dtype=torch.long)[None])
    finally:
        for h in handles:
            h.remove()
    k = model.config.num_experts_per_tok
    ids = [torch.softmax(logits[i].float(), -1).topk(k, -1).indices for i in range(len(sites))]
    return torch.stack(ids, 1).reshape(len(token_ids), -1)


def test_captured_ids_equal_plain_forward_topk(tiny_moe, tokenizer):
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    routed = generate_routed(tiny_moe, chats, max_new_tokens=12, pad_id=tokenizer.pad_token_id)
    for chat, r in zip(chats, routed, strict=True):
        assert r.n_prompt == len(chat.ids) and r.n_generated >= 1
        assert len(r.token_ids) == r.n_prompt + r.n_generated == len(r.experts)
        assert r.is_generated.sum() == r.n_generated
        ref = plain_topk(tiny_moe, r.token_ids)
        # Same expert sets per (token, layer); order within the top-k is the router's order too.
        assert torch.equal(torch.as_tensor(r.experts, dtype=torch.long), ref)


def test_generation_matches_hf_generate(tiny_moe, tokenizer):
    chat = render_chat(tokenizer, TEXTS[1])
    r = generate_routed(tiny_moe, [chat], max_new_tokens=10, pad_id=tokenizer.pad_token_id)[0]
    out = tiny_moe.generate(
        input_ids=torch.tensor([chat.ids]), max_new_tokens=10, do_sample=False
    )[0, len(chat.ids) :].tolist()
    assert r.token_ids[r.n_prompt :].tolist() == out[: r.n_generated]


def test_batch_n_equals_batch_1(tiny_moe, tokenizer):
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    pad = tokenizer.pad_token_id
    batched = generate_routed_all(tiny_moe, chats, 12, pad, batch_size=len(chats))
    single = generate_routed_all(tiny_moe, chats, 12, pad, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert (a.experts == b.experts).all()
        assert abs(a.weights.astype(float) - b.weights.astype(float)).max() < 2e-3


def test_template_mask_marks_only_user_text(tokenizer):
    chat = render_chat(tokenizer, "Tell me a joke")
    user = [t for t, m in zip(chat.ids, chat.is_template, strict=True) if not m]
    assert tokenizer.decode(user) == "Tell me a joke"


def test_dense_model_is_rejected(tiny_dense):
    with pytest.raises(DenseModelError, match="dense model"):
        RoutingRecorder(tiny_dense)


def test_run_capture_writes_contract_and_resumes(tiny_moe, tokenizer, tmp_path, monkeypatch):
    cfg = CaptureConfig(max_new_tokens=6, shard_prompts=2)
    meta = {"model": "tiny", "model_fingerprint": "tiny-0"}
    df = prompts_frame()
    backend = TransformersBackend(tiny_moe, tokenizer, batch_size=2)
    full = run_capture(backend, tokenizer, df, cfg, tmp_path / "a", tmp_path / "a.parquet",
                       tmp_path / "cache", meta)
    shards = sorted((tmp_path / "a").glob("*.parquet"))
    assert len(shards) == 3 and not any((tmp_path / "cache").iterdir())
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [e["file"] for e in manifest["shards"]] == [s.name for s in shards]
    assert manifest["model_config"] == {"n_layers": 3, "top_k": 2, "n_experts": 8}
    assert manifest["metadata"]["model_fingerprint"] == "tiny-0"
    assert manifest["n_prompts"] == len(df) and manifest["n_rows"] == sum(
        pq.read_metadata(s).num_rows for s in shards)
    assert manifest["generations"]["sha256"] == sha256_file(tmp_path / "a.parquet")
    md = pq.read_schema(shards[0]).metadata
    assert md[b"n_layers"] == b"3" and md[b"top_k"] == b"2" and md[b"n_experts"] == b"8"
    assert md[b"backend"] == b"transformers"
    table = pd.concat([pd.read_parquet(s) for s in shards])
    assert set(table["prompt_id"]) == set(df["prompt_id"])
    per = table.groupby("prompt_id")["position"].agg(["min", "max", "count"])
    assert (per["min"] == 0).all() and (per["max"] == per["count"] - 1).all()
    assert len(table["experts"].iloc[0]) == 3 * 2
    counts = full.set_index("prompt_id")
    assert (table.groupby("prompt_id").size() ==
            counts["n_prompt_tokens"] + counts["n_generated_tokens"]).all()

    # Kill the run in the second shard, then resume: same final output.
    real = backend.generate_and_capture
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(backend, "generate_and_capture", dying)
    with pytest.raises(KeyboardInterrupt):
        run_capture(backend, tokenizer, df, cfg, tmp_path / "b", tmp_path / "b.parquet",
                    tmp_path / "cache", meta)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.parquet").exists()
    monkeypatch.setattr(backend, "generate_and_capture", real)
    resumed = run_capture(backend, tokenizer, df, cfg, tmp_path / "b", tmp_path / "b.parquet",
                          tmp_path / "cache", meta)
    pd.testing.assert_frame_equal(full, resumed)
    for s in shards:
        assert pq.read_table(s).equals(pq.read_table(tmp_path / "b" / s.name))


@pytest.mark.parametrize(
    "frame, match",
    [
        (prompts_frame().iloc[:0], "no prompts"),
        (prompts_frame().assign(label=["safe", "harmful", "safe", "unsafe", "safe"]), "harmful"),
        (prompts_frame().assign(label="safe"), "no 'unsafe' prompts"),
        (prompts_frame().drop(columns="label"), "missing column"),
        (prompts_frame().assign(text=["a", None, "b", "c", "d"]), "prompt 'p1' has no text"),
        (prompts_frame().assign(text=["a", "b", 3, "c", "d"]), "'p2' has text 3 of type int"),
        (prompts_frame().assign(text=["a", "b", "c", " \n ", "d"]), "prompt 'p3' has blank text"),
        (prompts_frame().assign(prompt_id=["p0", None, "p2", "p3", "p4"]), "prompt_id nan .text"),
    ],
)
def test_bad_prompt_tables(tiny_moe, tokenizer, tmp_path, frame, match):
    cfg = CaptureConfig(4, 2)
    with pytest.raises(ValueError, match=match):
        run_capture(TransformersBackend(tiny_moe, tokenizer), tokenizer, frame, cfg,
                    tmp_path / "r", tmp_path / "g.parquet", tmp_path / "c", TINY_META)
    assert not (tmp_path / "r").exists() and not (tmp_path / "g.parquet").exists()


def test_prompt_longer_than_context(tiny_moe, tokenizer, tmp_path):
    df = prompts_frame([" ".join(["word"] * 600), "hi there"])
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        run_capture(TransformersBackend(tiny_moe, tokenizer), tokenizer, df, CaptureConfig(4, 2),
                    tmp_path / "r",
                    tmp_path / "g.parquet", tmp_path / "c", TINY_META)
    assert not (tmp_path / "r").exists()
