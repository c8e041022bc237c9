"""Generate text with a trained MAT-Steer checkpoint applied (core.generation.greedy_generate,
the package's one greedy loop, checked against transformers' `model.generate`).

Library: `generate(model, tokenizer, prompts, module, config)`; the hook lives only inside
`mat_steering(...)` and is removed on exit, also on errors. From the command line:
`steerline generate --mat models/mat_steer --prompt "..." --compare` (steerline.cli).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.core.generation import greedy_generate_all, pad_id
from steerline.mat_steer.checkpoint import SteeringConfig, mat_steering
from steerline.steering.gated import SteeringModule


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
               chat: bool = True) -> list[list[int]]:
    """Each prompt as one user turn of the chat template when the tokenizer has one (`chat`),
    else as plain text with the tokenizer's own special tokens (e.g. a BOS)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [render_chat(tokenizer, p).ids for p in prompts]
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             module: SteeringModule | None = None, config: SteeringConfig | None = None,
             max_new_tokens: int = 64, chat: bool = True, min_new_tokens: int = 0,
             batch_size: int | None = None) -> list[str]:
    """Greedy continuations of `prompts` (batches of `batch_size`, all in one when None; left
    padded), steered when `module` is given.

    The steering hook edits every token of every sequence at the checkpoint's layer: the prompt
    tokens in the first forward and each new token afterwards."""
    if not prompts:
        return []
    if (module is None) != (config is None):
        raise ValueError("pass both the steering module and its config, or neither")
    ids = prompt_ids(tokenizer, prompts, chat)
    ctx = (mat_steering(model, module, config) if module is not None
           else contextlib.nullcontext())
    with ctx:
        answers = greedy_generate_all(model, ids, max_new_tokens, pad_id(tokenizer),
                                      batch_size or len(ids), min_new_tokens)
    return [tokenizer.decode(a, skip_special_tokens=True) for a, _ in answers]
