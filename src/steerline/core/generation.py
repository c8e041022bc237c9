"""Generation helpers shared by every stage: padding, eos ids, and the one greedy decoding loop.

Every greedy answer in the package comes from `greedy_generate`: a KV-cached argmax loop over one
left-padded batch. The routing capture (steering.capture) is the same loop with a router recorder
called after each forward; build_models, eval_safety, the transformers backend and MAT-Steer's
`generate` call it plainly. tests/test_generation.py checks it against a loop without cache or
padding and against transformers' `model.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

T = TypeVar("T")
R = TypeVar("R")
# called after every forward of the loop with that forward's (batch, tokens per row)
AfterForward = Callable[[int, int], None]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pid)


def right_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [B, L], attention_mask [B, L]) padded on the right.

    Right padding keeps every real token at the position it has alone, so with a causal mask the
    real tokens' states do not depend on the padding."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [B, L], attention_mask [B, L]) padded on the left, so every
    row's next token is at the last column. The mask is positional, not `ids != pad_id`: the pad
    id (<|im_end|> for SmolLM2) also occurs inside real prompts."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
    min_new_tokens: int = 0, after_forward: AfterForward | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy answers to one batch: per prompt, the answer cut after its first end token, and
    whether it ended on one. `min_new_tokens`: end tokens are barred from the first that many
    steps (benches that time a fixed length). `after_forward` runs after each forward (a router
    recorder); with it the last answer token is fed too, so every answer token passes through
    the model once."""
    dev = next(model.parameters()).device
    eos = torch.tensor(sorted(eos_ids(model)), dtype=torch.long, device=dev)
    ids, mask = (t.to(dev) for t in left_pad(prompts, pad_id))  # [B, W]
    b, width = ids.shape
    cache = DynamicCache()
    # Pads get position 0 (masked anyway); real tokens count from 0 as they would alone.
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True)
    if after_forward is not None:
        after_forward(b, width)
    logits = out.logits[:, -1]  # [B, V]
    next_pos = mask.sum(1)  # [B] position of the token fed next
    alive = torch.ones(b, dtype=torch.bool, device=dev)  # [B] no end token yet
    steps: list[torch.Tensor] = []  # per step [B]; pad_id once a row has ended
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits = logits.index_fill(-1, eos, float("-inf"))
        nxt = torch.where(alive, logits.argmax(-1), pad_id)
        steps.append(nxt)
        alive = alive & ~torch.isin(nxt, eos)
        last = step == max_new_tokens - 1 or not bool(alive.any())
        if last and after_forward is None:
            break  # the next logits would go unused
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        if after_forward is not None:
            after_forward(b, 1)
        if last:
            break
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]  # [B, S]
    end = set(eos.tolist())
    answers = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in end), len(row))
        answers.append((row[:cut], cut > 0 and row[cut - 1] in end))
    return answers


def map_batches(fn: Callable[[list[T]], list[R]], items: Sequence[T], batch_size: int,
                key: Callable[[T], int] | None = None, desc: str | None = None) -> list[R]:
    """`fn` over batches of `items` (in order, or sorted by `key`: similar lengths pad less),
    results back in the order of `items`."""
    order = list(range(len(items)))
    if key is not None:
        order.sort(key=lambda i: key(items[i]))
    out: list[R | None] = [None] * len(items)
    chunks = list(batched(order, batch_size))
    for _, chunk in chunks if desc is None else tqdm(chunks, desc=desc, leave=False):
        for i, r in zip(chunk, fn([items[i] for i in chunk]), strict=True):
            out[i] = r
    return out  # type: ignore[return-value]


def greedy_generate_all(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
    batch_size: int, min_new_tokens: int = 0, by_length: bool = False, desc: str | None = None,
) -> list[tuple[list[int], bool]]:
    """greedy_generate over many prompts, in batches taken in order or (`by_length`) by prompt
    length; the batches, hence the float bytes, of each stage's answers depend on that choice."""
    return map_batches(lambda chunk: greedy_generate(model, chunk, max_new_tokens, pad_id,
                                                     min_new_tokens),
                       prompts, batch_size, key=len if by_length else None, desc=desc)


def batched(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]
