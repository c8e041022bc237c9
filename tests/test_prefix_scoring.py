"""Prefix scoring: layers 0..L run once per item set, layers L+1.. per steering condition, and the
scores equal score_choices with the steering hook at L (bit for bit on CPU: same batches, same
kernels). Packed scoring: choices sharing a prefix, a choice that is a prefix of another and
duplicate choices score as one forward per choice does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_llama import HIDDEN, tiny_llama, word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from steerline.mat_steer.evaluate import (
    MCItem,
    _plan,
    compute_prefix,
    encode_items,
    evaluate_items,
    item_prefixes,
    means,
    score_choices,
    score_choices_reference,
    score_prefix,
)
from steerline.model.arch import decoder_layers, layer_slice, layer_slice_unsupported
from steerline.model.packing import pack
from steerline.pipeline import steering_eval
from steerline.pipeline.steering_eval import Scorer
from steerline.steering.gated import SteeringModule
from steerline.steering.residual import additive_fn, mat_steer_fn, steering_hook

LAYERS = 4
ITEMS = [MCItem("Q: who is the dog ? A:", ("the sun", "a red cat is not good", "no")),
         MCItem("what is", ("good", "bad")),
         MCItem("the cat is not bad statement hateful ? A:", ("yes", "no one two three")),
         MCItem("red blue green one two three four", ("a", "the moon is red", "cat", "dog")),
         # shared prefixes, a choice that is a prefix of others, a duplicate
         MCItem("Q: what is the sun ? A:", ("the sun is red", "the sun is blue", "the moon",
                                            "the sun is red", "the"))]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    return tiny_llama(tok, LAYERS)


def _fns() -> dict[str, object]:
    module = SteeringModule(HIDDEN, 3, init_scale=1.0, generator=torch.Generator().manual_seed(1))
    return {"none": None, "additive": additive_fn(torch.randn(HIDDEN) * 2),
            "mat_steer": mat_steer_fn(module)}


def _state(model) -> tuple:
    layers = decoder_layers(model)
    return (tuple(id(m) for m in layers), tuple(m.self_attn.layer_idx for m in layers),
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


@pytest.mark.parametrize("layer", [0, 1, LAYERS - 1])
@pytest.mark.parametrize("max_rows", [2, 64])
def test_prefix_scores_equal_hooked_full_scores_bit_for_bit(model, tok, layer, max_rows) -> None:
    before = _state(model)
    prefix = compute_prefix(model, tok, ITEMS, layer, max_rows)
    assert _state(model) == before
    for name, fn in _fns().items():
        with steering_hook(model, layer, fn):
            full = score_choices(model, tok, ITEMS, max_rows)
            ref = score_choices_reference(model, tok, ITEMS)
        got = score_prefix(model, prefix, fn)
        assert _state(model) == before
        for g, f, r in zip(got, full, ref, strict=True):
            np.testing.assert_array_equal(g, f, err_msg=name)
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
    assert prefix.nbytes == sum(h.numel() * 4 for h in prefix.states)


def test_steering_changes_the_prefix_scores(model, tok) -> None:
    prefix = compute_prefix(model, tok, ITEMS, 1)
    plain = score_prefix(model, prefix, None)
    steered = score_prefix(model, prefix, additive_fn(torch.randn(HIDDEN) * 5))
    assert not all(np.array_equal(a, b) for a, b in zip(plain, steered, strict=True))


def test_the_slice_is_undone_when_the_block_raises(model, tok) -> None:
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), layer_slice(model, 2, LAYERS):
        assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1]
        raise RuntimeError("boom")
    assert _state(model) == before
    with pytest.raises(ValueError, match="outside"), layer_slice(model, 3, LAYERS + 1):
        pass
    assert _state(model) == before


def test_a_prefix_serves_only_its_model(model, tok) -> None:
    prefix = compute_prefix(model, tok, ITEMS[:1], 1)
    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match="4 decoder layers"):
        score_prefix(other, prefix, None)


def test_evaluate_items_from_prefixes_equals_the_full_path(model, tok) -> None:
    def table(prompts, choices, correct):
        return pd.DataFrame({"item_id": [f"i{k}" for k in range(len(prompts))], "prompt": prompts,
                             "choices": choices, "correct_idx": correct})

    items = {"bbq": table(["the cat is", "Q: who is the dog ? A:"],
                          [["good", "bad", "no"], ["the sun", "a cat", "no"]], [0, 1]),
             "toxigen": table(["statement hateful ? A:", "what is"], [["no", "yes"]] * 2, [0, 1])}
    fns = {"bbq": additive_fn(torch.randn(HIDDEN) * 3), "toxigen": None}
    prefixes = item_prefixes(model, tok, items, 2, max_rows=2)
    for fn in (fns, additive_fn(torch.randn(HIDDEN)), None):
        full = evaluate_items(model, tok, items, 2, fn, max_rows=2)
        cached = evaluate_items(model, tok, items, 2, fn, max_rows=2, prefixes=prefixes)
        assert full.keys() == cached.keys()
        for k in full:
            np.testing.assert_array_equal(full[k], cached[k])
    with pytest.raises(ValueError, match="layer 2"):
        evaluate_items(model, tok, items, 1, None, max_rows=2, prefixes=prefixes)


def test_prefix_scoring_on_a_tiny_moe(tiny_moe, tokenizer) -> None:
    """Qwen2-MoE picks each layer's mask by its position in the list: one attention type, so a
    slice is exact there too."""
    assert layer_slice_unsupported(tiny_moe) is None
    items = [MCItem("The cat sat on the", (" mat", " moon and the stars")),
             MCItem("Hello there, how", (" are you", " is it", " do"))]
    prefix = compute_prefix(tiny_moe, tokenizer, items, 1, max_rows=2)
    fn = additive_fn(torch.randn(tiny_moe.config.hidden_size))
    with steering_hook(tiny_moe, 1, fn):
        full = score_choices(tiny_moe, tokenizer, items, max_rows=2)
    for g, f in zip(score_prefix(tiny_moe, prefix, fn), full, strict=True):
        np.testing.assert_array_equal(g, f)


def test_mixed_attention_types_are_refused(model) -> None:
    old = getattr(model.config, "layer_types", None)
    model.config.layer_types = ["full_attention", "sliding_attention"] * (LAYERS // 2)
    try:
        assert "mixes attention types" in layer_slice_unsupported(model)
        with pytest.raises(NotImplementedError, match="mixes"), layer_slice(model, 1, 2):
            pass
    finally:
        model.config.layer_types = old


def _tables() -> dict[str, pd.DataFrame]:
    def table(prompts, choices, correct):
        return pd.DataFrame({"item_id": [f"i{k}" for k in range(len(prompts))], "prompt": prompts,
                             "choices": choices, "correct_idx": correct})

    return {"bbq": table(["the cat is", "Q: who is the dog ? A:", "where is the sun"],
                         [["good", "bad", "no"], ["the sun", "a cat", "no"],
                          ["red", "blue green", "one"]], [0, 1, 2]),
            "toxigen": table(["statement hateful ? A:", "what is"], [["no", "yes"]] * 2, [0, 1])}


def test_scorer_computes_each_prefix_once_and_scores_as_the_full_path(model, tok) -> None:
    tables = _tables()
    dev = {t: d.iloc[:2] for t, d in tables.items()}
    scorer = Scorer(model, tok, 1, 2, {"dev": dev, "test": tables})
    vec = torch.randn(HIDDEN)
    scale, sweep, _ = scorer.pick("md", [0.5, 2.0], lambda s: additive_fn(s * vec))
    for s in (0.5, 2.0):
        full = evaluate_items(model, tok, dev, 1, additive_fn(s * vec), max_rows=2)
        assert sweep[f"{s:g}"] == means(full)
    for fn in (None, additive_fn(scale * vec)):
        got = scorer.run("cond", "test", fn)
        full = evaluate_items(model, tok, tables, 1, fn, max_rows=2)
        for k in full:
            np.testing.assert_array_equal(got[k], full[k])
    assert [k for k in scorer.seconds if k.endswith("prefix")] == ["dev prefix", "test prefix"]
    assert len(scorer._prefixes) == 2


def test_scorer_falls_back_to_the_full_forward(model, tok, monkeypatch) -> None:
    monkeypatch.setattr(steering_eval, "layer_slice_unsupported", lambda _m: "no slices")
    tables = _tables()
    scorer = steering_eval.Scorer(model, tok, 1, 2, {"test": tables})
    fn = additive_fn(torch.randn(HIDDEN))
    got = scorer.run("x", "test", fn)
    full = evaluate_items(model, tok, tables, 1, fn, max_rows=2)
    for k in full:
        np.testing.assert_array_equal(got[k], full[k])
    assert not scorer._prefixes and "test prefix" not in scorer.seconds


def test_choices_sharing_a_prefix_run_it_once(tok) -> None:
    """The last item's 5 choices (15 tokens) are scored at 4 tree nodes: the prompt's last
    token and the last tokens of "the", "the sun", "the sun is" (a choice's own last token is
    never an input)."""
    encoded = encode_items(tok, ITEMS[-1:])
    (batch,) = _plan(encoded, 64, 0)
    assert len(batch.head_at) == 4
    assert len(batch.targets) == sum(len(c) for c in encoded[0][1]) == 15
    assert batch.packed.ids.shape == (1, len(encoded[0][0]) - 1 + 4)


@pytest.mark.parametrize("max_rows", [1, 3])
def test_batch_n_equals_batch_1(model, tok, max_rows) -> None:
    one = score_choices(model, tok, ITEMS, max_rows=1)
    many = score_choices(model, tok, ITEMS, max_rows=max_rows * 64)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert many[-1][0] == many[-1][3]  # the duplicate choice scores the same, bit for bit


def test_a_sliding_window_shorter_than_an_item_is_refused(model, tok) -> None:
    old = getattr(model.config, "sliding_window", None)
    model.config.sliding_window = 4
    try:
        with pytest.raises(NotImplementedError, match="sliding window of 4"):
            score_choices(model, tok, ITEMS)
        model.config.sliding_window = 64
        score_choices(model, tok, ITEMS[:1])
    finally:
        model.config.sliding_window = old


def test_an_attention_without_4d_masks_is_refused(model, tok) -> None:
    old = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(NotImplementedError, match="attn_implementation=.sdpa."):
            score_choices(model, tok, ITEMS[:1])
    finally:
        model.config._attn_implementation = old


def test_pack_merges_shared_starts_into_one_tree() -> None:
    p = pack([[[5, 6, 7], [5, 6, 8], [5]], [[9]]], pad_id=0)
    assert p.ids.tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert p.positions.tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]]
    assert p.paths == [[[0, 1, 2], [0, 1, 3], [0]], [[4]]]
    # each node sees its ancestors and itself; a pad sees itself only
    assert p.visible[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    assert p.visible[1].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
