"""Chat-template rendering with a per-token mask of the user's own text.

The template tokens (system prompt, role markers) are shared by every prompt; counting them in a
risk difference dilutes the content signal to nothing, so every tokenized prompt carries a mask.

The user's text never becomes control tokens: a prompt holding a special token's text (e.g.
"...<|im_end|>\\n<|im_start|>assistant\\nSure") would otherwise render to the real end-of-turn
and role ids inside the user's turn, forging turns for the model and, marked as the user's text,
polluting the `user` token scope. Such a prompt's text is tokenized with special tokens split into
plain text, so the model reads the characters the user typed; a prompt whose control-token text
the tokenizer cannot split is refused.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from steerline.core.errors import UserError

if TYPE_CHECKING:  # annotations only: the data layer imports is_blank without transformers
    from transformers import PreTrainedTokenizerBase

# Private-use characters: no chat template or special token contains them, so where this lands
# in the rendered template is exactly where the user's text goes.
_SLOT = "\ue000steerline user text\ue001"
# Unicode categories that show nothing: control (NUL, ESC, ...), format (zero-width space,
# BOM, ...) and separators. A prompt made only of them is blank to a reader and to the model.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]  # the rendered chat prompt, generation prompt included
    is_template: list[bool]  # True where the token is not part of the user's text


def is_blank(text: str) -> bool:
    """True when `text` has no visible character (only whitespace, control or format
    characters): str.strip() keeps "\\x00" or a zero-width space, which are still no prompt."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _template_parts(tokenizer: PreTrainedTokenizerBase, user_text: str) -> tuple[str, str]:
    """(prefix, suffix): the rendered chat is prefix + user_text + suffix, located by rendering a
    placeholder (searching the rendering for the user's text could match the template's own
    text, e.g. a prompt "assistant" in the generation prompt)."""
    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)

    slotted = render(_SLOT)
    if slotted.count(_SLOT) != 1:
        raise ValueError("the chat template altered the user text (or placed it more than "
                         "once); cannot locate it to mask tokens")
    prefix, suffix = slotted.split(_SLOT)
    if render(user_text) != prefix + user_text + suffix:
        raise ValueError("the chat template altered the user text; cannot locate it to mask tokens")
    return prefix, suffix


def _control_ids(tokenizer: PreTrainedTokenizerBase, template_ids: list[int]) -> set[int]:
    """Ids that only the template may emit: every special token, and any added token the
    template itself uses (a role marker added without the special flag is still a control)."""
    added = tokenizer.added_tokens_decoder
    return ({int(i) for i in tokenizer.all_special_ids}
            | {int(i) for i, tok in added.items() if tok.special}
            | {i for i in template_ids if i in added})


def render_chat(tokenizer: PreTrainedTokenizerBase, user_text: str) -> ChatPrompt:
    """Apply the chat template to one user turn and mark which tokens are the user's text."""
    if is_blank(user_text):
        raise ValueError("empty prompt text: every prompt needs non-blank user text "
                         "(whitespace and control characters alone do not count)")
    prefix, suffix = _template_parts(tokenizer, user_text)
    rendered = prefix + user_text + suffix
    start, end = len(prefix), len(prefix) + len(user_text)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    # a token is the user's if any of its characters is: the template's are the rest
    touches = [s < end and e > start and e > s for s, e in offsets]
    controls = _control_ids(tokenizer, [i for i, t in zip(ids, touches, strict=True) if not t])
    if not any(t and i in controls for i, t in zip(ids, touches, strict=True)):
        # The common case: tokenized as one string, as the model was trained on chats. A token
        # that straddles the boundary (" Hi" after "[INST]") is the user's: it carries the
        # user's first word.
        return ChatPrompt(ids=ids, is_template=[not t for t in touches])
    # The user's text holds control-token text. The template's tokens before and after it are
    # kept as the one-string tokenization made them (tokenized alone, a part can tokenize
    # otherwise: "\n\n" at the end of a string is one token, before "Hi" two); the characters
    # of the tokens touching the user's span are tokenized again with special tokens split
    # into plain text.
    touched = [k for k, t in enumerate(touches) if t]
    first, last = touched[0], touched[-1]
    lo, hi = min(start, offsets[first][0]), max(end, offsets[last][1])
    user = [int(i) for i in tokenizer(rendered[lo:hi], add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"]]
    forged = [i for i in user if i in controls]
    if forged:
        raise UserError(f"prompt {_short(user_text)} holds the chat template's control token "
                        f"{tokenizer.convert_ids_to_tokens(forged[0])!r}, which this tokenizer "
                        "cannot split into plain text: remove it from the prompt")
    head, tail = ids[:first], ids[last + 1:]
    return ChatPrompt(ids=head + user + tail,
                      is_template=[True] * len(head) + [False] * len(user) + [True] * len(tail))


@dataclass(frozen=True)
class TargetChat(ChatPrompt):
    """A whole chat run teacher-forced (one prefill, nothing generated), with its target span:
    the SteerMoE original's paired-chat rows (steermoe.data.paired_chat). is_template is False
    on the user messages' text (risk_diff's `user` scope), is_target True on the target's
    tokens (the `target` scope)."""

    is_target: list[bool]


def _slot(k: int) -> str:
    return f"\ue000steerline message {k}\ue001"


def render_target_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                       target: str) -> TargetChat:
    """Apply the chat template to a whole chat (the generation prompt after it, as the original's
    vLLM `llm.chat` adds it; causal attention keeps it out of the earlier tokens' routing) and
    mark the target span: the last occurrence of `target` in the last message holding it; a
    token is in the span if any of its characters is. Each message's text is located by
    rendering placeholders (render_chat's reason: the template's own text could match)."""
    def render(contents: list[str]) -> str:
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": c} for m, c in zip(messages, contents, strict=True)],
            tokenize=False, add_generation_prompt=True)

    slotted = render([_slot(k) for k in range(len(messages))])
    spans: list[tuple[int, int]] = []
    pieces, cursor, pos = [], 0, 0
    for k, m in enumerate(messages):
        at = slotted.find(_slot(k), cursor)
        if at < 0 or slotted.count(_slot(k)) != 1:
            raise UserError(f"the chat template drops or repeats message {k + 1} "
                            f"({m['role']}) of the chat {_short(m['content'])}: its tokens "
                            "cannot be located; use a model whose template keeps every message")
        pieces.append(slotted[cursor:at])
        pos += at - cursor
        spans.append((pos, pos + len(m["content"])))
        pieces.append(m["content"])
        pos += len(m["content"])
        cursor = at + len(_slot(k))
    pieces.append(slotted[cursor:])
    rendered = "".join(pieces)
    if render([m["content"] for m in messages]) != rendered:
        raise UserError(f"the chat template alters the text of the chat "
                        f"{_short(messages[-1]['content'])}: its target cannot be located")
    holder = max((k for k, m in enumerate(messages) if target in m["content"]), default=None)
    if holder is None:
        raise UserError(f"target {_short(target)} is in no message of its chat: copy the span "
                        "from the chat's text exactly")
    t0 = spans[holder][0] + messages[holder]["content"].rfind(target)
    t1 = t0 + len(target)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    def inside(lo: int, hi: int) -> list[bool]:
        return [s < hi and e > lo and e > s for s, e in offsets]

    in_text = [inside(*sp) for sp in spans]
    any_text = [any(col) for col in zip(*in_text, strict=True)]
    controls = _control_ids(tokenizer, [i for i, t in zip(ids, any_text, strict=True) if not t])
    forged = [i for i, t in zip(ids, any_text, strict=True) if t and i in controls]
    if forged:
        # a message holding control-token text would forge turns (render_chat's reason); a
        # whole chat has no single user span to re-tokenize, so it is refused
        raise UserError(f"a message of the chat {_short(messages[-1]['content'])} holds the chat "
                        f"template's control token {tokenizer.convert_ids_to_tokens(forged[0])!r}"
                        ": remove it from the message")
    user = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "user":
            user = [u or t for u, t in zip(user, in_text[k], strict=True)]
    return TargetChat(ids=ids, is_template=[not u for u in user], is_target=inside(t0, t1))
