"""Stage eval_baselines: the unsteered model and the mean-difference baselines on each task's
dev and test items, the references eval_steering compares MAT-Steer with.

Nothing here reads the MAT-Steer checkpoint or its training params, so a loss weight or a
training change (`dvc exp run -S lambda_sparse=0.5`) reruns train_steering and eval_steering
and takes these scores from DVC's cache. Conditions, each applied by a hook at the activations'
layer to every token:
- base: the unsteered model;
- mean_diff: the sum over attributes of mean(pos) - mean(neg) of the train activations, times a
  scale chosen on dev (`eval_steering.mean_diff_scales`);
- single_attribute: each task steered only by its own attribute's mean-difference vector (scale
  chosen on dev), the interference reference: mean_diff - single_attribute is what steering the
  other attributes costs.
Writes the per-item test values (values.parquet: condition, metric, item_id, value) and the dev
choices (choices.json: layer, scales, dev sweeps, the mean-difference direction's norm).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from steerline.core.io import atomic_dir, write_json, write_parquet, write_timings
from steerline.core.params import Params
from steerline.mat_steer.activations import (
    load_all_activations,
    mean_difference_vectors,
    split_pos_neg,
)
from steerline.model.arch import decoder_layers
from steerline.model.load import load_causal_lm
from steerline.pipeline.steering_eval import CHOICES, VALUES, Scorer, eval_items, item_rows
from steerline.steering.residual import additive_fn

log = logging.getLogger("eval_baselines")


@dataclass(frozen=True)
class Inputs:
    attributes: Path  # data/attributes: one Parquet per task
    activations: Path  # data/activations: the layer's activations, row-aligned


@dataclass(frozen=True)
class Outputs:
    baselines: Path  # folder: values.parquet + choices.json


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    p = params.eval_steering
    torch.manual_seed(params.seed)
    attributes = params.attribute_names  # each is a task scored on its own items
    tables = {task: pd.read_parquet(inputs.attributes / f"{task}.parquet") for task in attributes}
    acts, labels, splits, kvs = load_all_activations(inputs.activations, attributes)
    sources = {(kv.get("layer"), kv.get("model")) for kv in kvs.values()}
    if len(sources) != 1:
        raise ValueError(f"attributes were extracted at different layers/models {sources}: "
                         "re-run extract_activations")
    ((layer_text, model_path),) = sources
    layer = int(layer_text)
    model, tokenizer = load_causal_lm(model_path, p.dtype)
    if not 0 <= layer < len(decoder_layers(model)):
        raise ValueError(f"activations are from layer {layer}; {model_path} has "
                         f"{len(decoder_layers(model))} layers: re-run extract_activations")
    test_items, dev_items = eval_items(tables, p, params.data_seed, attributes)
    scorer = Scorer(model, tokenizer, layer, p.max_rows, {"dev": dev_items, "test": test_items})

    train = split_pos_neg(acts, labels, splits, "train")
    vectors = mean_difference_vectors({a: train[a] for a in attributes})  # [T, D]
    direction = vectors.sum(0)  # [D]
    own = {t: vectors[i] for i, t in enumerate(attributes)}  # task -> its own attribute's [D]

    def all_fn(s: float):
        return additive_fn(s * direction)

    def single_fn(s: float):
        return {t: additive_fn(s * v) for t, v in own.items()}

    md_scale, md_sweep, md_edge = scorer.pick("mean_diff", p.mean_diff_scales, all_fn,
                                              p.grid_extend)
    single_scale, single_sweep, single_edge = scorer.pick(
        "single_attribute", p.mean_diff_scales, single_fn, p.grid_extend)
    values = {"base": scorer.run("base", "test", None),
              "mean_diff": scorer.run("mean_diff", "test", all_fn(md_scale)),
              "single_attribute": scorer.run("single_attribute", "test", single_fn(single_scale))}
    choices = {"layer": layer, "model": model_path,
               "scales": {"mean_diff": md_scale, "single_attribute": single_scale},
               "dev_sweeps": {"mean_diff": md_sweep, "single_attribute": single_sweep},
               "at_grid_edge": {"mean_diff": md_edge, "single_attribute": single_edge},
               "mean_diff_direction_norm": float(direction.norm())}
    with atomic_dir(out.baselines) as tmp:
        write_parquet(item_rows(values, test_items), tmp / VALUES)
        write_json(choices, tmp / CHOICES)
    write_timings("eval_baselines", {**scorer.seconds, "total": time.perf_counter() - t0})
