"""Batched greedy generation that records the routing of every real token (transformers backend).

Generation is a plain KV-cached greedy loop (left padding) so that every row a router sees maps
to exactly one (sequence, position): the prefill step covers the prompt, step s covers generated
token s-1, and one extra decode step covers the last generated token, which generation itself
never feeds back. Padding rows and rows after a sequence's end are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from steerline.core.chat import ChatPrompt
from steerline.core.generation import batched, eos_ids
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
    """Forward hooks on every router; `steps` collects per-forward [rows, L, k] ids/weights."""

    def __init__(self, model: nn.Module) -> None:
        self.sites = find_routers(model)
        self.n_experts, self.top_k = moe_shape(model)
        self._ids: list[torch.Tensor | None] = []
        self._weights: list[torch.Tensor | None] = []

    def _hook(self, layer: int):
        rule = self.sites[layer].rule

        def hook(module, args, output):
            _, ids, weights = router_topk(output, rule)
            self._ids[layer] = ids.detach()
            self._weights[layer] = weights.detach()

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[RoutingRecorder]:
        handles = [s.module.register_forward_hook(self._hook(i)) for i, s in enumerate(self.sites)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def begin(self) -> None:
        self._ids = [None] * len(self.sites)
        self._weights = [None] * len(self.sites)

    def collect(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, weights of the last forward as [B, T, L * k] (layer-major)."""
        if any(x is None for x in self._ids):
            raise RuntimeError("a router did not run in the last forward")
        ids = torch.stack(self._ids, dim=1).reshape(batch, seq, -1)  # [B, T, L*k]
        w = torch.stack(self._weights, dim=1).reshape(batch, seq, -1)
        return ids, w


class _NoRecorder:
    """Stands in for RoutingRecorder when timing generation without capture (empty routing)."""

    def __init__(self, rec: RoutingRecorder, batch: int) -> None:
        self.width = len(rec.sites) * rec.top_k
        self.batch = batch

    @contextlib.contextmanager
    def recording(self):
        yield self

    def begin(self) -> None:
        pass

    def collect(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros((batch, seq, self.width), dtype=torch.int16)
        return empty, empty.to(torch.float16)


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
    capture: bool = True,
) -> list[Routed]:
    """Greedy-generate one batch (left padded) and capture its routing (`capture=False`: the
    same loop with no hooks, the baseline for the capture overhead)."""
    recorder = recorder or RoutingRecorder(model)
    if not capture:
        recorder = _NoRecorder(recorder, len(prompts))
    eos = eos_ids(model)
    b = len(prompts)
    lens = torch.tensor([len(p.ids) for p in prompts])
    width = int(lens.max())
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p.ids) :] = torch.tensor(p.ids)
        mask[i, width - len(p.ids) :] = 1
    cache = DynamicCache()
    eos_t = torch.tensor(sorted(eos))
    alive = torch.ones(b, dtype=torch.bool)  # [B] still generating
    gen_tokens: list[torch.Tensor] = []  # per step [B]
    gen_real: list[torch.Tensor] = []  # per step [B]: the token belongs to the answer
    step_ids: list[torch.Tensor] = []  # per step [B, L*k]: routing of that token
    step_w: list[torch.Tensor] = []
    with recorder.recording():
        recorder.begin()
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
        p_ids, p_w = recorder.collect(b, width)  # [B, T, L*k]
        logits = out.logits[:, -1]
        next_pos = lens.clone()
        for _ in range(max_new_tokens):
            if not bool(alive.any()):
                break
            nxt = torch.where(alive, logits.argmax(-1), torch.full((b,), pad_id))
            gen_real.append(alive.clone())
            gen_tokens.append(nxt)
            alive = alive & ~torch.isin(nxt, eos_t)
            # Feed the new token: this records its routing (and gives the next logits), so the
            # last answer token is routed too.
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            recorder.begin()
            out = model(input_ids=nxt[:, None], attention_mask=mask,
                        position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            s_ids, s_w = recorder.collect(b, 1)
            step_ids.append(s_ids[:, 0])
            step_w.append(s_w[:, 0])
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
    results = []
    for i, p in enumerate(prompts):
        n_p = len(p.ids)
        real = slice(width - n_p, width)
        n_g = sum(int(r[i]) for r in gen_real)  # real tokens form a prefix of the steps
        gen = [int(gen_tokens[s][i]) for s in range(n_g)]
        g_ids = torch.stack([step_ids[s][i] for s in range(n_g)]) if n_g else p_ids[i, :0]
        g_w = torch.stack([step_w[s][i] for s in range(n_g)]) if n_g else p_w[i, :0]
        results.append(
            Routed(
                token_ids=np.asarray(p.ids + gen, dtype=np.int32),
                is_generated=np.r_[np.zeros(n_p, bool), np.ones(n_g, bool)],
                is_template=np.r_[np.asarray(p.is_template, bool), np.zeros(n_g, bool)],
                experts=torch.cat([p_ids[i, real], g_ids]).to(torch.int16).numpy(),
                weights=torch.cat([p_w[i, real], g_w]).to(torch.float16).numpy(),
                n_prompt=n_p,
                n_generated=n_g,
                finished=bool(n_g and gen[-1] in eos),
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
    capture: bool = True,
) -> list[Routed]:
    """generate_routed over many prompts, in batches of similar length (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    recorder = RoutingRecorder(model)
    out: list[Routed | None] = [None] * len(prompts)
    for _, chunk in tqdm(list(batched(order, batch_size)), desc=desc, leave=False):
        res = generate_routed(
            model, [prompts[i] for i in chunk], max_new_tokens, pad_id, recorder, capture
        )
        for i, r in zip(chunk, res, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]
