"""The one greedy decoding loop (steerline.core.generation.greedy_generate): batch-N equals
batch-1, it equals a loop that reruns the whole sequence each step (no cache, no padding) and
transformers' `model.generate`, a router recorder hooked after each forward changes no token,
and the routing capture built on it answers with the same tokens."""

from __future__ import annotations

import pytest
import torch

from steerline.core.chat import render_chat
from steerline.core.generation import (
    eos_ids,
    greedy_generate,
    greedy_generate_all,
    left_pad,
    map_batches,
)
from steerline.steering.capture import generate_routed, generate_routed_all

TEXTS = ["Hi", "What is 2+2?", "How can I kill a Python process?",
         "Write a poem about the sea and the wind at night, with three short stanzas.",
         "Explain how vaccines train the immune system, briefly, for a teenager."]
NEW = 12


@pytest.fixture(params=["tiny_moe", "tiny_dense"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture()
def chats(tokenizer):
    return [render_chat(tokenizer, t) for t in TEXTS]


@pytest.fixture()
def prompts(chats) -> list[list[int]]:
    return [c.ids for c in chats]


@torch.no_grad()
def argmax_no_cache(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The reference: one prompt, the full sequence rerun every step, argmax of the last logits."""
    eos, seq = eos_ids(model), list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(nxt)
        if nxt in eos:
            return seq[len(prompt):], True
    return seq[len(prompt):], False


def test_left_pad_is_positional():
    ids, mask = left_pad([[5, 7], [7, 7, 7]], pad_id=7)  # the pad id also inside prompts
    assert ids.tolist() == [[7, 5, 7], [7, 7, 7]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_batch_n_equals_batch_1_equals_no_cache_loop(model, prompts, tokenizer):
    pad = tokenizer.pad_token_id
    batched = greedy_generate(model, prompts, NEW, pad)
    single = [greedy_generate(model, [p], NEW, pad)[0] for p in prompts]
    assert batched == single == [argmax_no_cache(model, p, NEW) for p in prompts]


@torch.no_grad()
def test_equals_transformers_generate(model, prompts, tokenizer):
    """model.generate (greedy, left padded, positional mask), cut after the first end token."""
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    eos = eos_ids(model)
    for min_new in (0, 7):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                             min_new_tokens=min_new, do_sample=False, pad_token_id=pad)
        ref = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            ref.append((row[:cut], row[cut - 1] in eos))
        assert greedy_generate(model, prompts, 10, pad, min_new_tokens=min_new) == ref
        assert all(len(a) >= min_new for a, _ in ref)  # no end token inside min_new_tokens


def test_after_forward_sees_every_forward_and_changes_nothing(tiny_moe, prompts, tokenizer):
    pad = tokenizer.pad_token_id
    calls: list[tuple[int, int]] = []
    hooked = greedy_generate(tiny_moe, prompts, 9, pad,
                             after_forward=lambda b, t: calls.append((b, t)))
    assert hooked == greedy_generate(tiny_moe, prompts, 9, pad)
    longest = max(len(a) for a, _ in hooked)
    # the prefill, then one forward per generated step: the last answer token is fed too
    assert calls == [(len(prompts), max(map(len, prompts)))] + [(len(prompts), 1)] * longest


def test_generate_all_batches_in_order_or_by_length(tiny_moe, prompts, tokenizer):
    pad = tokenizer.pad_token_id
    ref = greedy_generate(tiny_moe, prompts, 8, pad)
    for by_length in (False, True):
        assert greedy_generate_all(tiny_moe, prompts, 8, pad, 2, by_length=by_length) == ref
    seen: list[list[int]] = []
    out = map_batches(lambda c: (seen.append(c), [x * 10 for x in c])[1], [3, 1, 2, 5, 4], 2,
                      key=lambda x: x)
    assert out == [30, 10, 20, 50, 40] and seen == [[1, 2], [3, 4], [5]]


def test_routing_capture_answers_with_the_same_tokens(tiny_moe, chats, tokenizer):
    pad = tokenizer.pad_token_id
    ref = greedy_generate(tiny_moe, [c.ids for c in chats], NEW, pad)
    for got in (generate_routed(tiny_moe, chats, NEW, pad),
                generate_routed_all(tiny_moe, chats, NEW, pad, batch_size=2)):
        assert [(r.token_ids[r.n_prompt:].tolist(), r.finished) for r in got] == ref
        # every prompt and answer token has its routing row
        assert all(r.experts.shape[0] == r.n_prompt + r.n_generated for r in got)
