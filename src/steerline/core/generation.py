"""Generation helpers shared by every stage: padding, eos ids, batched greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


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


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    pad_id: int) -> list[tuple[list[int], bool]]:
    """One batch through `model.generate` (greedy, left padded): per prompt, the answer cut
    after its first end token, and whether it ended on one. The attention mask is positional:
    the pad id (<|im_end|> for SmolLM2) also occurs inside real prompts."""
    eos = eos_ids(model)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.long().to(dev),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append((row[:cut], cut > 0 and row[cut - 1] in eos))
    return answers


def batched(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]
