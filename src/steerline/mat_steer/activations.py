"""Residual-stream activations after one decoder layer, texts packed as token trees.

"After decoder layer `layer`" (0-based) is the output of `model.model.layers[layer]`, i.e.
`output_hidden_states[layer + 1]` of a plain forward for every layer but the last (the last entry
of `hidden_states` has the final norm applied). Capture stops the forward at that layer, so the
layers above it and the LM head are never computed.

Contract (data/activations/): `{attribute}.npy` float32 [N, D] + `{attribute}.parquet` with
`example_id`, `group_id`, `label`, `split` (rows aligned) and key-value metadata `layer`,
`pooling`, `model`, `hidden_size`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.core.generation import pad_id
from steerline.core.io import parquet_metadata, read_npy
from steerline.model.arch import check_layer, decoder_layers
from steerline.model.packing import additive_mask, check_packed_attention, pack

Pooling = Literal["last", "mean"]
META_COLUMNS = ["example_id", "group_id", "label", "split"]


def resolve_layer(n_layers: int, layer: int | None, layer_ratio: float) -> int:
    """An explicit `layer`, or round(layer_ratio * n_layers) (MAT-Steer: 14 of 32 -> 13 of 30)."""
    if layer is None:
        layer = int(round(layer_ratio * n_layers))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layers} decoder "
                         f"layers (valid: 0..{n_layers - 1})")
    return layer


class _Stop(Exception):
    pass


@contextlib.contextmanager
def capture_layer_output(model: nn.Module, layer: int, stop: bool = True) -> Iterator[dict]:
    """Within the block, forwards store the output of decoder layer `layer` in box["hidden"]
    ([B, L, D]) and, if `stop`, abort the forward right there (caller catches nothing: use
    `run_to_layer`). The hook is always removed."""
    check_layer(model, layer)
    box: dict = {}

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        box["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def run_to_layer(model: nn.Module, layer: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Hidden states after decoder layer `layer`: input_ids [B, L] -> [B, L, D]. The mask is
    [B, L] (padding) or a prepared [B, 1, L, L] one (packed rows, with their positions)."""
    with capture_layer_output(model, layer, stop=True) as box:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
        except _Stop:
            pass
    if "hidden" not in box:
        raise RuntimeError(f"decoder layer {layer} was not called by the forward")
    return box["hidden"]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
             max_length: int | None = None) -> list[list[int]]:
    """Token ids per text (special tokens as the tokenizer adds them); over-long texts keep their
    last `max_length` tokens (the answer is at the end)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    if max_length is not None:
        ids = [x[-max_length:] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise ValueError("an empty text: every text needs at least one token")
    return ids


@torch.inference_mode()
def extract_activations(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        texts: Sequence[str], layer: int, pooling: Pooling = "last",
                        batch_size: int = 32, max_length: int | None = 512,
                        desc: str = "activations") -> np.ndarray:
    """texts [N] -> float32 [N, D]: the residual stream after decoder layer `layer`, pooled
    over each text's tokens (`last`: its last token; `mean`: all of them).

    Texts run in token order, `batch_size` per forward packed as one token tree
    (steerline.model.packing), so texts that start alike (the same context with other answers)
    compute that start once; returned in input order."""
    check_layer(model, layer)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    ids = tokenize(tokenizer, texts, max_length)
    check_packed_attention(model, max(len(x) for x in ids))
    order = sorted(range(len(ids)), key=ids.__getitem__)  # shared prefixes side by side
    out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    pid, dtype = pad_id(tokenizer), next(model.parameters()).dtype
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch"):
        idx = order[start: start + batch_size]
        packed = pack([[ids[i] for i in idx]], pid)  # one row [1, W]
        hidden = run_to_layer(model, layer, packed.ids.to(model.device),
                              additive_mask(packed.visible, dtype).to(model.device),
                              packed.positions.to(model.device))[0].float()  # [W, D]
        paths = packed.paths[0]
        if pooling == "last":
            pooled = hidden[torch.tensor([path[-1] for path in paths], device=hidden.device)]
        else:
            pooled = torch.stack([hidden[torch.tensor(path, device=hidden.device)].mean(0)
                                  for path in paths])
        out[idx] = pooled.cpu().numpy()  # [len(idx), D]
    return out


def load_activations(directory: str | Path, attribute: str) -> tuple[np.ndarray, pd.DataFrame,
                                                                    dict[str, str]]:
    """(acts float32 [N, D], metadata DataFrame [N rows], key-value metadata), validated."""
    directory = Path(directory)
    npy, meta_path = directory / f"{attribute}.npy", directory / f"{attribute}.parquet"
    for p in (npy, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: run the extract_activations stage")
    acts = read_npy(npy)
    meta = pd.read_parquet(meta_path)
    if acts.ndim != 2 or acts.dtype != np.float32:
        raise ValueError(f"{npy}: expected a float32 [N, D] array, got {acts.dtype} {acts.shape}")
    if acts.shape[0] != len(meta):
        raise ValueError(f"{attribute}: activations have {acts.shape[0]} rows but the metadata "
                         f"has {len(meta)}: the two files are out of sync, re-run "
                         "extract_activations")
    missing = set(META_COLUMNS) - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing columns {sorted(missing)}")
    if not np.isfinite(acts).all():
        raise ValueError(f"{npy}: activations contain NaN or inf")
    return acts, meta, parquet_metadata(meta_path)




def load_all_activations(directory: str | Path, attributes: Sequence[str]
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                    dict[str, np.ndarray], dict[str, dict[str, str]]]:
    """Per attribute (load_activations): activations [N, D], labels [N], splits [N] and the
    key-value metadata."""
    acts, labels, splits, kvs = {}, {}, {}, {}
    for name in attributes:
        acts[name], meta, kvs[name] = load_activations(directory, name)
        labels[name], splits[name] = meta["label"].to_numpy(), meta["split"].to_numpy()
    return acts, labels, splits, kvs


@dataclass(frozen=True)
class PosNeg:
    """One attribute's activations on one split: pos [P, D], neg [Q, D] (float32)."""

    pos: torch.Tensor
    neg: torch.Tensor


def split_pos_neg(acts: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                  splits: Mapping[str, np.ndarray], split: str) -> dict[str, PosNeg]:
    """Per attribute: rows of `split` with label pos / neg. Raises if a class is empty."""
    out = {}
    for name in acts:
        in_split = np.asarray(splits[name]) == split
        lab = np.asarray(labels[name])
        pos, neg = acts[name][in_split & (lab == "pos")], acts[name][in_split & (lab == "neg")]
        for kind, arr in (("positive", pos), ("negative", neg)):
            if len(arr) == 0:
                raise ValueError(f"attribute {name!r} has no {kind} examples in the {split} "
                                 "split: fix data/attributes (prepare_attributes) so that every "
                                 "attribute has both labels in train and dev")
        out[name] = PosNeg(torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float32)),
                           torch.from_numpy(np.ascontiguousarray(neg, dtype=np.float32)))
    return out


def mean_difference_vectors(train: Mapping[str, PosNeg]) -> torch.Tensor:
    """[T, D]: mean(pos) - mean(neg) of each attribute's train activations."""
    return torch.stack([d.pos.mean(0) - d.neg.mean(0) for d in train.values()])
