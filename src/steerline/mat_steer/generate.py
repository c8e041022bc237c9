"""Generate text with a trained MAT-Steer checkpoint applied (steerline.core.generation's loop).

Library: `generate(model, tokenizer, prompts, module, config)`; the hook lives only inside
`mat_steering(...)` and is removed on exit, also on errors. From the command line:
`steerline generate --mat models/mat_steer --prompt "..." --compare` (steerline.cli).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.core.generation import greedy_generate, pad_id
from steerline.mat_steer.checkpoint import SteeringConfig, mat_steering
from steerline.steering.gated import SteeringModule


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   chat: bool = True) -> list[str]:
    """Wrap each prompt in the chat template (one user turn) when the tokenizer has one."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             module: SteeringModule | None = None, config: SteeringConfig | None = None,
             max_new_tokens: int = 64, chat: bool = True, min_new_tokens: int = 0) -> list[str]:
    """Greedy continuations of `prompts` (one batch, left-padded), steered when `module` is
    given; `min_new_tokens` bars end tokens from the first that many steps (fixed-length timing).

    The steering hook edits every token of every sequence at the checkpoint's layer: the prompt
    tokens in the first forward and each new token afterwards."""
    if not prompts:
        return []
    if (module is None) != (config is None):
        raise ValueError("pass both the steering module and its config, or neither")
    texts = render_prompts(tokenizer, prompts, chat)
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    ctx = (mat_steering(model, module, config) if module is not None
           else contextlib.nullcontext())
    with ctx:
        answers = greedy_generate(model, ids, max_new_tokens, pad_id(tokenizer),
                                  min_new_tokens=min_new_tokens)
    return tokenizer.batch_decode([a for a, _ in answers], skip_special_tokens=True)
