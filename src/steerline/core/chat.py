"""Chat-template rendering with a per-token mask of the user's own text.

The template tokens (system prompt, role markers) are shared by every prompt; counting them in a
risk difference dilutes the content signal to nothing, so every tokenized prompt carries a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]  # the rendered chat prompt, generation prompt included
    is_template: list[bool]  # True where the token is not part of the user's text


def render_chat(tokenizer: PreTrainedTokenizerBase, user_text: str) -> ChatPrompt:
    """Apply the chat template to one user turn and mark which tokens are the user's text."""
    if not user_text.strip():
        raise ValueError("empty prompt text: every prompt needs non-blank user text")
    messages = [{"role": "user", "content": user_text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = rendered.rfind(user_text)
    if start < 0:
        raise ValueError("the chat template altered the user text; cannot locate it to mask tokens")
    end = start + len(user_text)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # A token is the user's if its characters lie inside the user span.
    is_template = [not (s >= start and e <= end and e > s) for s, e in enc["offset_mapping"]]
    return ChatPrompt(ids=ids, is_template=is_template)
