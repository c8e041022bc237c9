"""The transformers backend: the reference implementation (exact checks run against it).

Generation is steerline.core.generation's greedy loop (KV cache, left padding); capture runs the
same loop with router hooks (steerline.steering.capture). Steering is per request at
the API level: prompts are grouped by their Steering and each group runs inside that request's
context managers, `expert_steering` (the SteerMoE router hook) and `steering.residual.steering_hook`
(activation steering on one decoder layer), which remove their hooks on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.backends.base import Backend, Generated, Prompt, prompt_ids
from steerline.core.chat import ChatPrompt
from steerline.core.generation import greedy_generate_all
from steerline.model.arch import (
    DenseModelError,
    context_length,
    decoder_layers,
    find_routers,
    moe_shape,
)
from steerline.steering.capture import Routed, check_context, generate_routed_all
from steerline.steering.experts import expert_steering
from steerline.steering.request import Steering, SteeringArg, per_prompt
from steerline.steering.residual import steering_hook


@contextlib.contextmanager
def hf_steering(model: nn.Module, steering: Steering | None) -> Iterator[None]:
    """One request's steering on a transformers model inside the block (hooks removed on exit)."""
    with contextlib.ExitStack() as stack:
        if steering is not None and steering.experts is not None and not steering.experts.empty:
            stack.enter_context(expert_steering(model, steering.experts))
        if steering is not None and steering.activation is not None:
            act = steering.activation
            act.check(int(model.config.hidden_size), len(decoder_layers(model)))
            device = next(model.parameters()).device
            stack.enter_context(steering_hook(model, act.layer, act.fn(device)))
        yield


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            self.n_experts, self.top_k = moe_shape(model)
            self.moe_layers = tuple(s.layer for s in find_routers(model))
            self.n_layers = len(self.moe_layers)
        except DenseModelError:
            self.n_experts = self.top_k = self.n_layers = 0
        self.max_context = context_length(model.config)

    @classmethod
    def load(cls, model_path: str, dtype: str = "float32",
             batch_size: int = 16) -> TransformersBackend:
        from steerline.model.load import load_causal_lm

        model, tokenizer = load_causal_lm(model_path, dtype)
        return cls(model, tokenizer, batch_size)

    def _groups(self, n: int, steering: SteeringArg) -> list[tuple[Steering | None, list[int]]]:
        plans = per_prompt(steering, n)
        groups: dict[str, tuple[Steering | None, list[int]]] = {}
        for i, plan in enumerate(plans):
            key = "" if plan is None else plan.plan_id
            groups.setdefault(key, (plan, []))[1].append(i)
        return list(groups.values())

    def _as_chats(self, prompts: Sequence[Prompt]) -> list[ChatPrompt]:
        out = []
        for p in prompts:
            ids = prompt_ids(p)
            out.append(p if isinstance(p, ChatPrompt) else ChatPrompt(ids, [True] * len(ids)))
        return out

    def generate_and_capture(self, prompts: Sequence[ChatPrompt], max_new_tokens: int,
                             steering: SteeringArg = None) -> list[Routed]:
        chats = self._as_chats(prompts)
        check_context(chats, None, max_new_tokens, self.max_context)
        out: list[Routed | None] = [None] * len(chats)
        for plan, idx in self._groups(len(chats), steering):
            with hf_steering(self.model, plan):
                res = generate_routed_all(self.model, [chats[i] for i in idx], max_new_tokens,
                                          self.pad_id, self.batch_size)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int,
                 steering: SteeringArg = None) -> list[Generated]:
        chats = self._as_chats(prompts)
        check_context(chats, None, max_new_tokens, self.max_context)
        out: list[Generated | None] = [None] * len(chats)
        for plan, idx in self._groups(len(chats), steering):
            with hf_steering(self.model, plan):
                # A MoE's prompts are batched by length like its capture, a dense model's in
                # request order: each prompt keeps the batch mates it always had.
                res = greedy_generate_all(self.model, [chats[i].ids for i in idx],
                                          max_new_tokens, self.pad_id, self.batch_size,
                                          by_length=self.n_layers > 0)
            for i, (answer, finished) in zip(idx, res, strict=True):
                out[i] = Generated(np.asarray(answer, dtype=np.int32), finished)
        return out  # type: ignore[return-value]
