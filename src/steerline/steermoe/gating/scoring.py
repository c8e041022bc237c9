"""Prompt gates applied: each gate's score and decision per prompt, from one unsteered prefill
of the model it gates (features.py). The answer_safety stages and `steerline generate --gate`
both score through `score_prompts`, so a gate fires on the same prompts in both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.steermoe.gating.features import prompt_features
from steerline.steermoe.gating.prompt_gate import PromptGate

GateScores = tuple[np.ndarray, np.ndarray]  # (score [N] float64, fires [N] bool)


def score_prompts(gates: Mapping[str, PromptGate], model: nn.Module,
                  tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int,
                  desc: str = "gate features") -> dict[str, GateScores]:
    """Each gate's (score, fires) per text, keyed as `gates`; one prefill feeds every gate (the
    residual layers any gate reads, the routing always)."""
    layers = sorted({gate.layer for gate in gates.values() if gate.layer is not None})
    feats = prompt_features(model, tokenizer, texts, layers, batch_size, desc=desc)
    return {key: (gate.scores(feats), gate.fires(feats)) for key, gate in gates.items()}
