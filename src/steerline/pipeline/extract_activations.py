"""Stage extract_activations: the dense model + the attribute tables -> per attribute, the
residual stream after decoder layer `layer` (pooled at the last token or over tokens) as
{attribute}.npy float32 [N, D] and {attribute}.parquet (example_id, group_id, label, split),
rows aligned with each other and with the attribute table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steerline.core.io import atomic_dir, write_npy, write_parquet
from steerline.core.params import ExtractActivations, Params
from steerline.mat_steer.activations import META_COLUMNS, extract_activations, resolve_layer
from steerline.model.arch import decoder_layers
from steerline.model.load import load_causal_lm

log = logging.getLogger("extract_activations")


@dataclass(frozen=True)
class Inputs:
    model: str  # the dense model folder (params.yaml `dense_model`), recorded as given
    attributes: Path  # folder: {task}.parquet, one per attribute of params.yaml's `attributes`


@dataclass(frozen=True)
class Outputs:
    activations: Path  # folder: {task}.npy + {task}.parquet


def extract_all(model: torch.nn.Module, tokenizer, tables: dict[str, pd.DataFrame],
                p: ExtractActivations) -> tuple[int, dict[str, np.ndarray]]:
    """Pure (given the model): (layer, {attribute: activations [N, D]})."""
    layer = resolve_layer(len(decoder_layers(model)), p.layer, p.layer_ratio)
    acts = {task: extract_activations(model, tokenizer, df["text"].tolist(), layer, p.pooling,
                                      p.batch_size, p.max_length, desc=f"extract {task}")
            for task, df in tables.items()}
    return layer, acts


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    p = params.extract_activations
    torch.manual_seed(params.seed)
    tables = {}
    for task in params.attribute_names:
        path = inputs.attributes / f"{task}.parquet"
        if not path.is_file():
            raise ValueError(f"{path} not found: run the prepare_attributes stage first")
        tables[task] = pd.read_parquet(path)
    model, tokenizer = load_causal_lm(inputs.model, p.dtype)
    layer, acts = extract_all(model, tokenizer, tables, p)
    meta = {"layer": str(layer), "pooling": p.pooling, "model": inputs.model,
            "hidden_size": str(model.config.hidden_size),
            "n_layers": str(len(decoder_layers(model)))}
    with atomic_dir(out.activations) as tmp:
        for task, df in tables.items():
            write_npy(acts[task], tmp / f"{task}.npy")
            write_parquet(df[META_COLUMNS], tmp / f"{task}.parquet", metadata=meta)
    log.info("layer %d, %s pooling: %s in %.1f s", layer, p.pooling,
             {t: a.shape for t, a in acts.items()}, time.perf_counter() - t0)
