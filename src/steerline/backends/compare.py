"""Compare two backends' greedy runs of the same prompts (answers and routing).

Two engines' float kernels differ in the last bits, so a greedy answer may split where the two
best next tokens are a float tie; the issue's criterion allows exactly that. `compare_runs`
counts identical answers, splits at a tie of the reference model's next-token logits, and other
splits (real disagreements), and the top-k expert-set agreement over each pair's common prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from steerline.steering.capture import Routed

TIE_GAP = 1e-2  # logits ~30 in float32: a gap below this is a last-bits tie, not a preference


@dataclass(frozen=True)
class RunComparison:
    topk_agreement: float  # token-layers with the same top-k expert set, over common prefixes
    identical: int  # pairs with identical token sequences
    tie_splits: int  # pairs that split where the reference's top-2 next tokens are a float tie
    other_splits: int  # pairs that split anywhere else (or unchecked: no reference model)

    @property
    def agree(self) -> bool:
        """Same answers up to float ties and >= 99.5% of token-layers routed alike."""
        return self.other_splits == 0 and self.topk_agreement >= 0.995


def split_at(a: Routed, b: Routed) -> int | None:
    """First token index where two runs differ (None: identical)."""
    x, y = a.token_ids.tolist(), b.token_ids.tolist()
    if x == y:
        return None
    return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                min(len(x), len(y)))


@torch.no_grad()
def is_float_tie(model: nn.Module, prefix: Sequence[int], tokens: set[int]) -> bool:
    """The reference model's two best next tokens after `prefix` are `tokens`, within TIE_GAP."""
    logits = model(input_ids=torch.tensor([list(prefix)])).logits[0, -1]
    top = torch.topk(logits.float(), 2)
    return set(top.indices.tolist()) == tokens and float(top.values[0] - top.values[1]) < TIE_GAP


def compare_runs(ref: Sequence[Routed], got: Sequence[Routed], top_k: int,
                 model: nn.Module | None = None) -> RunComparison:
    """`model` (the reference backend's) checks each split for a float tie; without it every
    split counts as other."""
    same, ties, other = [], 0, 0
    for a, b in zip(ref, got, strict=True):
        d = split_at(a, b)
        n = len(a.token_ids) if d is None else d
        if d is not None:
            x, y = a.token_ids, b.token_ids
            tie = (model is not None and d < min(len(x), len(y))
                   and is_float_tie(model, x[:d].tolist(), {int(x[d]), int(y[d])}))
            ties, other = ties + tie, other + (not tie)
        sa, sb = (np.sort(r.experts[:n].reshape(n, -1, top_k), -1) for r in (a, b))
        same.append((sa == sb).all(-1).ravel())
    rate = float(np.concatenate(same).mean()) if same else 1.0
    return RunComparison(rate, len(ref) - ties - other, ties, other)
