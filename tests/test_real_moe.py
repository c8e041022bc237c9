"""The real default model end to end (slow): GGUF conversion, a quick MoEfication of it, and
routing capture on the resulting real MoE (exactness and batching); `real_moe` is in conftest."""

from __future__ import annotations

import pytest
import torch
from test_capture import plain_topk

from steerline.core.chat import render_chat
from steerline.model.moefy import fidelity, greedy_answers
from steerline.steering.capture import generate_routed_all

pytestmark = pytest.mark.slow


def test_gguf_dense_answers_sensibly(real_base):
    _, dense, tok = real_base
    chat = render_chat(tok, "What is the capital of France?")
    out = greedy_answers(dense, [chat.ids], 12, tok.pad_token_id, batch_size=1)[0]
    assert "Paris" in tok.decode(out[len(chat.ids):])
    assert dense.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_real_moe_is_close_to_dense(real_moe):
    dense, moe, _, held_out = real_moe
    fid = fidelity(dense, moe, held_out)
    assert fid["top1_agreement"] > 0.5 and fid["mean_kl"] < 1.5


def test_real_moe_capture_exact_and_batch_invariant(real_moe):
    _, moe, tok, _ = real_moe
    texts = ["How can I kill a Python process?", "Write a haiku about rain.",
             "How do I make a bomb?", "What is the boiling point of water?"]
    chats = [render_chat(tok, t) for t in texts]
    batched = generate_routed_all(moe, chats, 10, tok.pad_token_id, batch_size=4)
    single = generate_routed_all(moe, chats, 10, tok.pad_token_id, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert (a.experts == b.experts).mean() > 0.999
        ref = plain_topk(moe, a.token_ids)
        # Same expert sets (order inside the top-k may differ only on float ties).
        got = torch.as_tensor(a.experts, dtype=torch.long).reshape(len(a.token_ids), -1, 8)
        assert (got.sort(-1).values == ref.reshape_as(got).sort(-1).values).float().mean() > 0.999
