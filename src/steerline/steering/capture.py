"""Batched greedy generation that records the routing of every real token (transformers backend).

Generation is steerline.core.generation.greedy_generate with a RoutingRecorder called after each
forward, so that every row a router sees maps to exactly one (sequence, position): the prefill
covers the prompt, step s covers generated token s-1, and the loop feeds the last generated
token once more (for its routing only). Padding rows and rows after a sequence's end are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from steerline.core.chat import ChatPrompt
from steerline.core.generation import greedy_generate, map_batches
from steerline.model.arch import find_routers, moe_shape, router_topk


@dataclass
class Routed:
    """One prompt's generation and routing; arrays cover prompt then answer tokens."""

    token_ids: np.ndarray  # [n] int32
    is_generated: np.ndarray  # [n] bool
    is_template: np.ndarray  # [n] bool (generated tokens: False)
    experts: np.ndarray  # [n, n_layers * top_k] int16, layer-major
    weights: np.ndarray  # [n, n_layers * top_k] float16
    n_prompt: int
    n_generated: int
    finished: bool  # stopped on an end-of-sequence token (not on max_new_tokens)


class RoutingRecorder:
    """Forward hooks on every router. `collect` returns the last forward's routing;
    `after_forward` (greedy_generate's callback) appends it to `steps`."""

    def __init__(self, model: nn.Module) -> None:
        self.sites = find_routers(model)
        self.n_experts, self.top_k = moe_shape(model)
        self._ids: list[torch.Tensor | None] = [None] * len(self.sites)
        self._weights: list[torch.Tensor | None] = [None] * len(self.sites)
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per forward [B, T, L*k]

    def _hook(self, layer: int):
        rule = self.sites[layer].rule

        def hook(module, args, output):
            _, ids, weights = router_topk(output, rule)
            self._ids[layer] = ids.detach()
            self._weights[layer] = weights.detach()

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[RoutingRecorder]:
        self.steps = []
        self._clear()
        handles = [s.module.register_forward_hook(self._hook(i)) for i, s in enumerate(self.sites)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _clear(self) -> None:
        self._ids = [None] * len(self.sites)
        self._weights = [None] * len(self.sites)

    def collect(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, weights of the last forward as [B, T, L * k] (layer-major)."""
        if any(x is None for x in self._ids):
            raise RuntimeError("a router did not run in the last forward")
        ids = torch.stack(self._ids, dim=1).reshape(batch, seq, -1)  # [B, T, L*k]
        w = torch.stack(self._weights, dim=1).reshape(batch, seq, -1)
        self._clear()  # the next forward must fill every layer again
        return ids, w

    def after_forward(self, batch: int, seq: int) -> None:
        self.steps.append(self.collect(batch, seq))


def check_context(prompts: Sequence[ChatPrompt | Sequence[int]], ids: Sequence[str] | None,
                  max_new: int, ctx: int) -> None:
    """The one context rule of every backend and command: each prompt's tokens plus
    max_new_tokens fit in the model's positions (`ctx`), checked before any generation (the
    transformers model would otherwise run past its positions for minutes and answer
    nonsense). `ids` name the prompts in the error (None: their 0-based index)."""
    names = [str(i) for i in range(len(prompts))] if ids is None else ids
    for pid, p in zip(names, prompts, strict=True):
        n = len(p.ids) if isinstance(p, ChatPrompt) else len(p)
        if n + max_new > ctx:
            raise ValueError(
                f"prompt {pid!r} has {n} tokens; with max_new_tokens={max_new} it "
                f"exceeds the model's context of {ctx}: shorten the prompt or lower max_new_tokens"
            )


@torch.no_grad()
def generate_routed(
    model: nn.Module,
    prompts: Sequence[ChatPrompt],
    max_new_tokens: int,
    pad_id: int,
    recorder: RoutingRecorder | None = None,
) -> list[Routed]:
    """Greedy-generate one batch (left padded) and capture its routing."""
    rec = recorder or RoutingRecorder(model)
    with rec.recording():
        answers = greedy_generate(model, [p.ids for p in prompts], max_new_tokens, pad_id,
                                  after_forward=rec.after_forward)
    (p_ids, p_w), *steps = rec.steps  # prefill [B, W, L*k], then per step [B, 1, L*k]
    width = p_ids.shape[1]
    results = []
    for i, (p, (gen, finished)) in enumerate(zip(prompts, answers, strict=True)):
        n_p, n_g = len(p.ids), len(gen)
        real = slice(width - n_p, width)
        ids = torch.cat([p_ids[i, real], *(steps[s][0][i] for s in range(n_g))])  # [n, L*k]
        w = torch.cat([p_w[i, real], *(steps[s][1][i] for s in range(n_g))])
        results.append(
            Routed(
                token_ids=np.asarray(p.ids + gen, dtype=np.int32),
                is_generated=np.r_[np.zeros(n_p, bool), np.ones(n_g, bool)],
                is_template=np.r_[np.asarray(p.is_template, bool), np.zeros(n_g, bool)],
                experts=ids.to(torch.int16).cpu().numpy(),
                weights=w.to(torch.float16).cpu().numpy(),
                n_prompt=n_p,
                n_generated=n_g,
                finished=finished,
            )
        )
    return results


def generate_routed_all(
    model: nn.Module,
    prompts: Sequence[ChatPrompt],
    max_new_tokens: int,
    pad_id: int,
    batch_size: int,
    desc: str = "capture",
) -> list[Routed]:
    """generate_routed over many prompts, in batches of similar length (less padding)."""
    rec = RoutingRecorder(model)
    return map_batches(lambda chunk: generate_routed(model, chunk, max_new_tokens, pad_id, rec),
                       prompts, batch_size, key=lambda p: len(p.ids), desc=desc)
