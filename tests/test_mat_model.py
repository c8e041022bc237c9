"""MAT-Steer on a tiny random Llama: activations, hooks, scoring, generation, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_llama import HIDDEN, tiny_llama, word_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from steerline.core.io import write_npy, write_parquet
from steerline.mat_steer.activations import extract_activations, load_activations, resolve_layer
from steerline.mat_steer.checkpoint import SteeringConfig, mat_steering
from steerline.mat_steer.evaluate import (
    MCItem,
    evaluate_items,
    score_choices,
    score_choices_reference,
)
from steerline.mat_steer.generate import generate
from steerline.model.arch import decoder_layers
from steerline.steering.gated import SteeringModule
from steerline.steering.residual import additive_fn, steering_hook

LAYERS = 2


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    model = tiny_llama(tok, LAYERS)
    with torch.no_grad():  # transformers installs its capture hooks on the first such call
        model(input_ids=torch.tensor([[3, 4]]), output_hidden_states=True)
    return model


TEXTS = ["the cat is good", "Q: who is the dog ? A: the sun", "a", "red blue green one two three",
         "what is not bad ?",
         # packed as token trees: a shared start, a text that is the start of others, a duplicate
         "Q: who is the dog ? A: the moon", "Q: who is the dog ?", "the cat is good"]


def _hidden_states(model, tok, text: str, layer: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batched_equals_single_equals_hidden_states(model, tok, pooling) -> None:
    layer = 0  # hidden_states[-1] is after the final norm, so compare a non-final layer
    batched = extract_activations(model, tok, TEXTS, layer, pooling, batch_size=4)
    np.testing.assert_array_equal(batched[0], batched[-1])  # the duplicate: the same node
    single = extract_activations(model, tok, TEXTS, layer, pooling, batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    for i, text in enumerate(TEXTS):
        hs = _hidden_states(model, tok, text, layer)
        ref = hs[-1] if pooling == "last" else hs.mean(0)
        np.testing.assert_allclose(batched[i], ref.numpy(), rtol=1e-5, atol=1e-5)


def test_layer_out_of_range(model, tok) -> None:
    with pytest.raises(ValueError, match="layer 2 is out of range: the model has 2 decoder"):
        extract_activations(model, tok, TEXTS, LAYERS, "last")
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(30, 30, 0.5)
    assert resolve_layer(30, None, 14 / 32) == 13
    assert resolve_layer(32, None, 14 / 32) == 14


def test_activations_and_metadata_of_different_lengths(tmp_path) -> None:
    write_npy(np.zeros((3, 4), np.float32), tmp_path / "x.npy")
    meta = pd.DataFrame({"example_id": ["a", "b"], "group_id": ["a", "b"], "label": ["pos", "neg"],
                         "split": ["train", "train"]})
    write_parquet(meta, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="3 rows but the metadata has 2"):
        load_activations(tmp_path, "x")


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_zero_steering_vectors_leave_logits_bit_identical(model, tok) -> None:
    module = SteeringModule(HIDDEN, 3, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.steering_vectors.zero_()
    cfg = SteeringConfig(["a", "b", "c"], layer=1, hidden_size=HIDDEN, model="tiny")
    base = _logits(model, tok, TEXTS)
    with mat_steering(model, module, cfg):
        steered = _logits(model, tok, TEXTS)
    assert torch.equal(base, steered)


def _hooks(model, i: int) -> set:
    """Forward hooks on decoder layer i (transformers installs its own capture hooks too)."""
    return set(decoder_layers(model)[i]._forward_hooks)


def test_hook_edits_every_token_and_is_always_removed(model, tok) -> None:
    layer = decoder_layers(model)[0]
    before = _hooks(model, 0)
    v = torch.randn(HIDDEN)
    seen = {}
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**enc, output_hidden_states=True).hidden_states[1]
        with steering_hook(model, 0, additive_fn(v)):
            h = layer.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
            model(**enc)
            h.remove()
    torch.testing.assert_close(seen["h"], plain + v)  # all sequences, all positions
    assert _hooks(model, 0) == before
    with pytest.raises(RuntimeError, match="boom"):
        with steering_hook(model, 0, additive_fn(v)):
            assert len(_hooks(model, 0)) == len(before) + 1
            raise RuntimeError("boom")
    assert _hooks(model, 0) == before


def test_checkpoint_for_another_hidden_size_is_refused(model) -> None:
    before = _hooks(model, 1)
    module = SteeringModule(HIDDEN + 8, 3)
    cfg = SteeringConfig(["a", "b", "c"], layer=1, hidden_size=HIDDEN + 8, model="other")
    with pytest.raises(ValueError, match="hidden size 40 .* model's hidden size is 32"):
        with mat_steering(model, module, cfg):
            pass
    assert _hooks(model, 1) == before


@pytest.mark.parametrize("steer", [False, True])
def test_shared_prompt_scoring_equals_full_forward(model, tok, steer) -> None:
    items = [MCItem("Q: who is the dog ? A:", ("the sun", "a red cat is not good", "no")),
             MCItem("what is", ("good", "bad")),
             MCItem("the cat is not bad statement hateful ? A:", ("yes", "no one two three"))]
    fn = additive_fn(torch.randn(HIDDEN) * 2) if steer else None
    with steering_hook(model, 0, fn):
        got = score_choices(model, tok, items, max_rows=2)
        ref = score_choices_reference(model, tok, items)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_generate_with_steering_and_cleanup(model, tok) -> None:
    module = SteeringModule(HIDDEN, 3, init_scale=1.0, generator=torch.Generator().manual_seed(1))
    cfg = SteeringConfig(["a", "b", "c"], layer=1, hidden_size=HIDDEN, model="tiny")
    prompts = ["the cat is", "Q: who is the dog ? A:"]
    before = _hooks(model, 1)
    plain = generate(model, tok, prompts, max_new_tokens=5, chat=False)
    with torch.no_grad():
        module.steering_vectors.zero_()
    zero = generate(model, tok, prompts, module, cfg, max_new_tokens=5, chat=False)
    assert zero == plain
    with torch.no_grad():
        module.steering_vectors.normal_(0, 50)
    steered = generate(model, tok, prompts, module, cfg, max_new_tokens=5, chat=False)
    assert steered != plain
    assert _hooks(model, 1) == before


def test_per_task_steering_equals_separate_runs(model, tok) -> None:
    """evaluate_items with a task -> function mapping steers each task by its own function only:
    the per-item values equal one run per task with that function alone."""
    def table(prompts, choices, correct):
        return pd.DataFrame({"item_id": [f"i{k}" for k in range(len(prompts))], "prompt": prompts,
                             "choices": choices, "correct_idx": correct})

    items = {"bbq": table(["the cat is", "Q: who is the dog ? A:"],
                          [["good", "bad", "no"], ["the sun", "a cat", "no"]], [0, 1]),
             "toxigen": table(["statement hateful ? A:", "what is"], [["no", "yes"]] * 2, [0, 1])}
    fns = {"bbq": additive_fn(torch.randn(HIDDEN) * 3), "toxigen": additive_fn(torch.randn(HIDDEN))}
    mixed = evaluate_items(model, tok, items, 0, fns, max_rows=2)
    for task, fn in fns.items():
        alone = evaluate_items(model, tok, {task: items[task]}, 0, fn, max_rows=2)
        for metric, values in alone.items():
            np.testing.assert_array_equal(mixed[metric], values)
    unsteered = evaluate_items(model, tok, items, 0, None, max_rows=2)
    assert set(unsteered) == {"bbq_acc", "toxigen_acc"} and len(unsteered["bbq_acc"]) == 2
