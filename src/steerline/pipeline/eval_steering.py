"""Stage eval_steering: MAT-Steer on each task's test split beside the baselines that
eval_baselines scored (base, mean_diff, single_attribute: see that stage), paired item by item.

MAT-Steer is the gated module applied by a hook at the checkpoint's layer to every token, its
steering vectors times a scale chosen on dev from `mat_scales` (1.0 = as trained); the test
items are scored once, after every dev choice. Metrics: TruthfulQA MC1/MC2, BBQ and ToxiGen
accuracy and their average per condition; paired bootstrap 95% CIs over items of the
differences; per attribute the gate's test AUROC beside an L2 logistic probe's (the linear
ceiling), gate medians on pos / neg, MMD(steered neg, pos) before / after; per-item values, the
gate histograms (`dvc plots`) and details (dev sweeps, item counts, interference verdicts);
wall-clock seconds in reports/timings/ (not a DVC output).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from steerline.core.io import read_json, staged_outputs, write_json, write_parquet, write_timings
from steerline.core.params import EvalSteering, Params
from steerline.mat_steer.activations import load_all_activations, split_pos_neg
from steerline.mat_steer.checkpoint import check_compatible, load_steering
from steerline.mat_steer.evaluate import means
from steerline.mat_steer.report import compare, gate_histograms, gate_report, verdict
from steerline.model.arch import decoder_layers
from steerline.model.load import load_causal_lm
from steerline.pipeline.steering_eval import (
    CHOICES,
    VALUES,
    Scorer,
    Values,
    eval_items,
    item_rows,
    values_from_rows,
)
from steerline.steering.gated import SteeringModule, with_vector_scale
from steerline.steering.residual import mat_steer_fn

log = logging.getLogger("eval_steering")


@dataclass(frozen=True)
class Inputs:
    attributes: Path  # data/attributes: one Parquet per task
    activations: Path  # data/activations: the layer's activations, row-aligned
    checkpoint: Path  # models/mat_steer
    baselines: Path  # eval_baselines' folder: the baselines' per-item test values and choices


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    details: Path
    items: Path
    hist: Path


@dataclass
class EvalRun:
    metrics: dict[str, Any]
    details: dict[str, Any]
    items: pd.DataFrame  # one row per (condition, metric, test item)
    hist: list[dict]  # gate histogram rows (dvc plots)
    seconds: dict[str, float]  # wall clock: reports/timings, never a DVC output


def evaluate_all(model: torch.nn.Module, tokenizer, tables: dict[str, pd.DataFrame],
                 acts: dict, labels: dict, splits: dict, module: SteeringModule, layer: int,
                 attributes: list[str], training: dict, p: EvalSteering, seed: int,
                 baselines: dict[str, Values], choices: dict
                 ) -> tuple[dict, dict, pd.DataFrame, list[dict], dict[str, float]]:
    """Pure given the model and the baselines: (metrics, details, per-item values, gate
    histogram rows, seconds per condition)."""
    test_items, dev_items = eval_items(tables, p, seed, attributes)
    scorer = Scorer(model, tokenizer, layer, p.max_rows, {"dev": dev_items, "test": test_items})

    def mat_fn(s: float):
        return mat_steer_fn(with_vector_scale(module, s))

    mat_scale, mat_sweep, mat_edge = scorer.pick("mat_steer", p.mat_scales, mat_fn,
                                                 p.grid_extend)
    edges = {**choices["at_grid_edge"], "mat_steer": mat_edge}
    for name, edge in edges.items():
        if edge is not None:  # the dev optimum may lie beyond: say so where the choice is read
            log.warning("%s: the dev pick %g is still at the %s of its grid after %d extra "
                        "point(s): widen the grid (params.yaml eval_steering)", name,
                        {**choices["scales"], "mat_steer": mat_scale}[name], edge, p.grid_extend)
    values = {**baselines, "mat_steer": scorer.run("mat_steer", "test", mat_fn(mat_scale))}

    train = split_pos_neg(acts, labels, splits, "train")
    dev = split_pos_neg(acts, labels, splits, "dev")
    test = split_pos_neg(acts, labels, splits, "test")
    bandwidths = [float(b) for b in training["bandwidths"]]
    gates = gate_report(module, attributes, train, dev, test, bandwidths,
                        [float(c) for c in training["probe_cs"]], float(training["scale"]))
    pairs = {"mat_steer_minus_base": ("mat_steer", "base"),
             "mat_steer_minus_mean_diff": ("mat_steer", "mean_diff"),
             "mean_diff_minus_base": ("mean_diff", "base"),
             # interference: the other attributes' vectors on top of the task's own
             "mean_diff_minus_single_attribute": ("mean_diff", "single_attribute"),
             "mat_steer_minus_single_attribute": ("mat_steer", "single_attribute")}
    paired = {name: compare(values[a], values[b], p.n_bootstrap, seed)
              for name, (a, b) in pairs.items()}
    interference = {name: {m: verdict(ci) for m, ci in paired[name].items()}
                    for name in ("mean_diff_minus_single_attribute",
                                 "mat_steer_minus_single_attribute")}
    metrics = {**{c: means(v) for c, v in values.items()}, "paired": paired, "gates": gates}
    details = {
        "layer": layer, "scales": {**choices["scales"], "mat_steer": mat_scale},
        "dev_sweeps": {**choices["dev_sweeps"], "mat_steer": mat_sweep},
        "at_grid_edge": edges,
        "interference": interference,
        "mean_diff_direction_norm": choices["mean_diff_direction_norm"],
        "steering_vector_norms": dict(zip(attributes,
                                          module.steering_vectors.norm(dim=1).tolist(),
                                          strict=True)),
        "n_test_items": {t: len(v) for t, v in test_items.items()},
        "n_dev_items": {t: len(v) for t, v in dev_items.items()},
        "n_test_activations": {a: [len(test[a].pos), len(test[a].neg)] for a in attributes},
    }
    items = item_rows(values, test_items)
    return metrics, details, items, gate_histograms(module, attributes, test), scorer.seconds


def run(params: Params, inputs: Inputs) -> EvalRun:
    t0 = time.perf_counter()
    p = params.eval_steering
    torch.manual_seed(params.seed)
    module, config = load_steering(inputs.checkpoint)
    missing = {"bandwidths", "scale", "probe_cs"} - set(config.training)
    if missing:
        raise ValueError(f"{inputs.checkpoint}/config.json lacks training {sorted(missing)} "
                         "(written by an older train_steering): re-run train_steering")
    attributes = params.attribute_names
    if config.attributes != attributes:
        raise ValueError(f"{inputs.checkpoint} steers the attributes {config.attributes}, "
                         f"params.yaml lists {attributes}: re-run train_steering")
    tables = {task: pd.read_parquet(inputs.attributes / f"{task}.parquet") for task in attributes}
    acts, labels, splits, kvs = load_all_activations(inputs.activations, attributes)
    for task, kv in kvs.items():
        if int(kv.get("layer", -1)) != config.layer:
            raise ValueError(f"{task} activations are from layer {kv.get('layer')} but the "
                             f"checkpoint is for layer {config.layer}: re-run the pipeline")
    choices = read_json(inputs.baselines / CHOICES)
    if choices["layer"] != config.layer or choices["model"] != config.model:
        raise ValueError(f"{inputs.baselines} was scored at layer {choices['layer']} of "
                         f"{choices['model']}, the checkpoint steers layer {config.layer} of "
                         f"{config.model}: re-run eval_baselines")
    test_items, _ = eval_items(tables, p, params.data_seed, attributes)
    baselines = values_from_rows(pd.read_parquet(inputs.baselines / VALUES), test_items)
    model, tokenizer = load_causal_lm(config.model, p.dtype)
    check_compatible(config, model.config.hidden_size, len(decoder_layers(model)))
    metrics, details, items, hist, seconds = evaluate_all(
        model, tokenizer, tables, acts, labels, splits, module, config.layer, config.attributes,
        config.training, p, params.seed, baselines, choices)
    seconds["total"] = time.perf_counter() - t0
    return EvalRun(metrics, details, items, hist, seconds)


def write(result: EvalRun, out: Outputs) -> None:
    write_timings("eval_steering", result.seconds)
    with staged_outputs() as staged:  # all four replace the previous run's, or none does
        write_parquet(result.items, staged(out.items))
        pd.DataFrame(result.hist).to_csv(staged(out.hist), index=False)
        write_json(result.metrics, staged(out.metrics))
        write_json(result.details, staged(out.details))


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    result = run(params, inputs)
    write(result, out)
    m = result.metrics
    log.info("gate AUROC %s (probe %s); average %s; done in %.0f s",
             {k: round(v["gate_auroc"], 3) for k, v in m["gates"].items()},
             {k: round(v["probe_auroc"], 3) for k, v in m["gates"].items()},
             {c: round(m[c]["average"], 4) for c in
              ("base", "mean_diff", "single_attribute", "mat_steer")},
             result.seconds["total"])
