"""Greedy answers of the safety evaluation's variants: in process (steerline.core.generation's
loop: KV cache, left padding, batches of similar prompt length, whatever hooks are active) or in
one backend call for every variant (vLLM: every request in flight at once, steered per request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.core.generation import greedy_generate_all
from steerline.steering.capture import check_context
from steerline.steering.experts import SteeringPlan
from steerline.steermoe.safety.gated import GatedPlan


@dataclass(frozen=True)
class Answer:
    text: str
    n_generated: int
    finished: bool


def greedy_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    max_new_tokens: int, batch_size: int, desc: str = "generate",
) -> list[Answer]:
    """Batched greedy answers (chat template applied) with whatever hooks are active."""
    chats = [render_chat(tokenizer, t) for t in texts]
    ctx = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    check_context(chats, [str(i) for i in range(len(chats))], max_new_tokens, ctx)
    answers = greedy_generate_all(model, [c.ids for c in chats], max_new_tokens,
                                  tokenizer.pad_token_id, batch_size, by_length=True, desc=desc)
    return [Answer(tokenizer.decode(a, skip_special_tokens=True).strip(), len(a), finished)
            for a, finished in answers]


def backend_answers(
    backend: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    plans: Sequence[SteeringPlan | GatedPlan | None], max_new_tokens: int,
) -> list[list[Answer]]:
    """Greedy answers to every text under each plan (None = unsteered; a GatedPlan steers only
    the prompts its gate fires on), in one backend call (vLLM: every request in flight at once,
    steered per request); one list per plan. Each distinct (prompt, plan) request runs once, in
    first-seen order, so a gated twin adds no request to its ungated twin and the unsteered run."""
    from steerline.backends import Steering

    chats = [render_chat(tokenizer, t) for t in texts]
    check_context(chats, [str(i) for i in range(len(chats))], max_new_tokens, backend.max_context)
    wrapped: dict[int, Steering] = {}  # id(plan) -> its request's steering
    keys: list[tuple[int, str | None]] = []  # per (plan, prompt): (prompt, steering plan_id)
    requests: dict[tuple[int, str | None], Steering | None] = {}
    for plan in plans:
        for i in range(len(chats)):
            p = plan.for_prompt(i) if isinstance(plan, GatedPlan) else plan
            st = None if p is None or p.empty else wrapped.setdefault(id(p), Steering(experts=p))
            key = (i, None if st is None else st.plan_id)
            requests.setdefault(key, st)
            keys.append(key)
    unique = list(requests)
    out = backend.generate([chats[i] for i, _ in unique], max_new_tokens,
                           steering=[requests[k] for k in unique])
    by_key = {k: Answer(tokenizer.decode(g.token_ids, skip_special_tokens=True).strip(),
                        len(g.token_ids), bool(g.finished)) for k, g in zip(unique, out,
                                                                         strict=True)}
    answers = [by_key[k] for k in keys]
    return [answers[i * len(chats): (i + 1) * len(chats)] for i in range(len(plans))]
