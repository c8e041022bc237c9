"""Token sequences packed as token trees: sequences that start alike share those tokens' states.

A row holds several sequences merged into one tree (node = a distinct prefix, in insertion
order, so a parent always comes before its children). Under `additive_mask(visible)` each node
attends to its ancestors and itself only, at `positions` = its depth, so every node's state is
the state its last token has in a forward of that sequence alone (to float rounding), and a
shared prefix is computed once. transformers hands a 4-D mask to sdpa / eager attention as it
is (masking_utils returns it unchanged), so `check_packed_attention` refuses what that would
get wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Packed:
    ids: torch.Tensor  # [G, W] token ids (pad id past each row's end)
    positions: torch.Tensor  # [G, W] each node's position (its depth)
    visible: torch.Tensor  # [G, W, W] bool: node w may attend to node w' (pads: themselves)
    paths: list[list[list[int]]]  # per row, per sequence: the flat index (g * W + w) of the node
    # of each of its tokens, in order


def _tree(seqs: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """(node tokens, node parents (-1: a root), per sequence its node per token)."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parent: list[int] = []
    paths: list[list[int]] = []
    for seq in seqs:
        path: list[int] = []
        for t in range(1, len(seq) + 1):
            key = tuple(seq[:t])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(seq[t - 1])
                parent.append(path[-1] if path else -1)
            path.append(index[key])
        paths.append(path)
    return tokens, parent, paths


def tree_size(seqs: Sequence[Sequence[int]]) -> int:
    """Nodes of the tree `pack` builds from `seqs` (the row's width before padding)."""
    return len(_tree(seqs)[0])


def pack(rows: Sequence[Sequence[Sequence[int]]], pad_id: int) -> Packed:
    """Each row's sequences merged into one tree, rows right-padded to the widest."""
    trees = [_tree(seqs) for seqs in rows]
    width = max(len(tokens) for tokens, _, _ in trees)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    visible = np.zeros((len(rows), width, width), dtype=bool)
    visible[:, np.arange(width), np.arange(width)] = True
    paths = []
    for g, (tokens, parent, seq_paths) in enumerate(trees):
        depth = np.zeros(len(tokens), dtype=np.int64)
        for k, p in enumerate(parent):
            if p >= 0:
                visible[g, k] = visible[g, p]
                visible[g, k, k] = True
                depth[k] = depth[p] + 1
        ids[g, : len(tokens)] = torch.tensor(tokens)
        positions[g, : len(tokens)] = torch.from_numpy(depth)
        paths.append([[g * width + k for k in path] for path in seq_paths])
    return Packed(ids, positions, torch.from_numpy(visible), paths)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[G, W, W] bool -> [G, 1, W, W] additive mask (0 where visible, the dtype's min where not)."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min).unsqueeze(1)


def check_packed_attention(model: nn.Module, longest: int) -> None:
    """Refuse what a packed 4-D mask would run wrongly: an attention that takes no 4-D mask, and
    a sliding window shorter than the longest sequence (the mask applies no window)."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        raise NotImplementedError(f"packed sequences need a 4-D attention mask, which "
                                  f"attn_implementation={impl!r} does not take: load the model "
                                  "with attn_implementation='sdpa' or 'eager'")
    types = getattr(cfg, "layer_types", None)
    windowed = ("sliding_attention" in types if types is not None
                else getattr(cfg, "use_sliding_window", True))
    window = getattr(cfg, "sliding_window", None) if windowed else None
    if window is not None and longest > window:
        raise NotImplementedError(f"a sequence of {longest} tokens runs past "
                                  f"{type(model).__name__}'s sliding window of {window}: packed "
                                  "sequences apply no window, so they would not run as the model "
                                  "does; shorten the texts")
