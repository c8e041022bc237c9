"""Generate text with a trained MAT-Steer checkpoint applied (transformers `model.generate`).

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

from steerline.mat_steer.checkpoint import SteeringConfig, mat_steering
from steerline.steering.gated import SteeringModule


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   chat: bool = True) -> list[str]:
    """Wrap each prompt in the chat template (one user turn) when the tokenizer has one."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             module: SteeringModule | None = None, config: SteeringConfig | None = None,
             max_new_tokens: int = 64, chat: bool = True, **gen_kwargs: object) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded), steered when `module` is given.

    The steering hook edits every token of every sequence at the checkpoint's layer: the prompt
    tokens in the first forward and each new token afterwards."""
    if not prompts:
        return []
    if (module is None) != (config is None):
        raise ValueError("pass both the steering module and its config, or neither")
    texts = render_prompts(tokenizer, prompts, chat)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = old_side
    enc = enc.to(next(model.parameters()).device)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id, **gen_kwargs}
    ctx = (mat_steering(model, module, config) if module is not None
           else contextlib.nullcontext())
    with ctx:
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
