"""MAT-Steer on the real default model (converted from the GGUF by the real_base fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerline.mat_steer.activations import extract_activations
from steerline.mat_steer.checkpoint import SteeringConfig, mat_steering
from steerline.mat_steer.evaluate import MCItem, score_choices, score_choices_reference
from steerline.model.load import load_causal_lm
from steerline.steering.gated import SteeringModule


@pytest.mark.slow
def test_real_model_activations_hooks_and_scoring(real_base) -> None:
    base = real_base[0]
    model, tok = load_causal_lm(base, device="cpu")
    layer, d = 13, model.config.hidden_size
    texts = ["Q: What is the capital of France?\nA: Paris", "The grandson was struggling."]
    acts = extract_activations(model, tok, texts, layer, "last", batch_size=2)
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1]
        np.testing.assert_allclose(acts[i], ref.numpy(), rtol=1e-4, atol=1e-4)

    module = SteeringModule(d, 3, init_scale=0.05, generator=torch.Generator().manual_seed(0))
    cfg = SteeringConfig(["a", "b", "c"], layer=layer, hidden_size=d, model=str(base))
    items = [MCItem("Q: Where is Paris?\nA:", ("In France.", "In Germany, near Berlin."))]
    with mat_steering(model, module, cfg):
        got = score_choices(model, tok, items)
        ref = score_choices_reference(model, tok, items)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)

    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits
        module.steering_vectors.zero_()
        with mat_steering(model, module, cfg):
            zero = model(**enc).logits
    assert torch.equal(base, zero)
