"""eval_steering's run: base vs mean-difference baselines vs MAT-Steer on each task's test split.

Conditions, each applied by a hook at the checkpoint's layer to every token:
- base: the unsteered model;
- mean_diff: the sum over attributes of mean(pos) - mean(neg) of the train activations, times a
  scale chosen on dev (`mean_diff_scales`);
- single_attribute: each task steered only by its own attribute's mean-difference vector (scale
  chosen on dev), the interference reference: mean_diff - single_attribute is what steering the
  other attributes costs;
- mat_steer: the gated MAT-Steer module (steering vectors times a scale chosen on dev from
  `mat_scales`; 1.0 = as trained).
`run` computes everything (test items are scored once per condition, after every dev choice),
`write` publishes it. Metrics: TruthfulQA MC1/MC2, BBQ and ToxiGen accuracy and their average per
condition; paired bootstrap 95% CIs over items of the differences; per attribute the gate's test
AUROC beside an L2 logistic probe's (the linear ceiling), gate medians on pos / neg,
MMD(steered neg, pos) before / after; per-item values, the gate histograms (`dvc plots`) and
details (dev sweeps, item counts, interference verdicts); wall-clock seconds in reports/timings/
(not a DVC output).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerline.core.io import staged_outputs, write_json, write_parquet, write_timings
from steerline.core.params import EvalSteering, Params
from steerline.mat_steer.activations import load_all_activations
from steerline.mat_steer.checkpoint import check_compatible, load_steering
from steerline.mat_steer.data import TASKS, task_rng
from steerline.mat_steer.evaluate import evaluate_items, task_items
from steerline.mat_steer.report import compare, gate_histograms, gate_report, means, verdict
from steerline.mat_steer.train import mean_difference_vectors, split_pos_neg
from steerline.model.arch import decoder_layers
from steerline.model.load import load_causal_lm
from steerline.steering.gated import SteeringModule, with_vector_scale
from steerline.steering.residual import additive_fn, mat_steer_fn

TASK_ATTRIBUTE = {"truthfulqa": "truthfulqa", "toxigen": "toxigen", "bbq": "bbq"}
log = logging.getLogger("eval_steering")


@dataclass(frozen=True)
class Inputs:
    attributes: Path  # data/attributes: one Parquet per task
    activations: Path  # data/activations: the layer's activations, row-aligned
    checkpoint: Path  # models/mat_steer


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
                 attributes: list[str], training: dict, p: EvalSteering, seed: int
                 ) -> tuple[dict, dict, pd.DataFrame, list[dict], dict[str, float]]:
    """Pure given the model: (metrics, details, per-item values, gate histogram rows, seconds per
    condition)."""
    timings: dict[str, float] = {}
    test_items = {t: task_items(tables[t], "test", p.max_test_items[t],
                                task_rng(seed, t + ":test")) for t in TASKS}
    dev_items = {t: task_items(tables[t], "dev", p.max_dev_items, task_rng(seed, t + ":dev"))
                 for t in TASKS}

    def run(name: str, items: dict, fn) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = evaluate_items(model, tokenizer, items, layer, fn, p.max_rows, name)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s (%.0f s)", name, {k: round(float(v.mean()), 4) for k, v in out.items()},
                 timings[name])
        return out

    def pick(name: str, scales: list[float], make_fn) -> tuple[float, dict]:
        """The scale with the best dev average over the metrics (no dev run for one scale)."""
        if len(scales) == 1:
            return scales[0], {}
        sweep = {f"{s:g}": means(run(f"{name} dev x{s:g}", dev_items, make_fn(s)))
                 for s in scales}
        return max(scales, key=lambda s: sweep[f"{s:g}"]["average"]), sweep

    train = split_pos_neg(acts, labels, splits, "train")
    vectors = mean_difference_vectors({a: train[a] for a in attributes})  # [T, D]
    direction = vectors.sum(0)  # [D]
    own = {t: vectors[attributes.index(TASK_ATTRIBUTE[t])] for t in TASKS}  # task -> [D]

    def all_fn(s: float):
        return additive_fn(s * direction)

    def single_fn(s: float):
        return {t: additive_fn(s * v) for t, v in own.items()}

    def mat_fn(s: float):
        return mat_steer_fn(with_vector_scale(module, s))

    md_scale, md_sweep = pick("mean_diff", p.mean_diff_scales, all_fn)
    single_scale, single_sweep = pick("single_attribute", p.mean_diff_scales, single_fn)
    mat_scale, mat_sweep = pick("mat_steer", p.mat_scales, mat_fn)
    values = {"base": run("base", test_items, None),
              "mean_diff": run("mean_diff", test_items, all_fn(md_scale)),
              "single_attribute": run("single_attribute", test_items, single_fn(single_scale)),
              "mat_steer": run("mat_steer", test_items, mat_fn(mat_scale))}

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
        "layer": layer, "scales": {"mean_diff": md_scale, "single_attribute": single_scale,
                                   "mat_steer": mat_scale},
        "dev_sweeps": {"mean_diff": md_sweep, "single_attribute": single_sweep,
                       "mat_steer": mat_sweep},
        "interference": interference,
        "mean_diff_direction_norm": float(direction.norm()),
        "steering_vector_norms": dict(zip(attributes,
                                          module.steering_vectors.norm(dim=1).tolist(),
                                          strict=True)),
        "n_test_items": {t: len(v) for t, v in test_items.items()},
        "n_dev_items": {t: len(v) for t, v in dev_items.items()},
        "n_test_activations": {a: [len(test[a].pos), len(test[a].neg)] for a in attributes},
    }
    rows = []
    for cond, vals in values.items():
        for metric, v in vals.items():
            ids = test_items[next(t for t in TASKS if metric.startswith(t))]["item_id"]
            rows.append(pd.DataFrame({"condition": cond, "metric": metric,
                                      "item_id": ids.to_numpy(), "value": v}))
    items = pd.concat(rows, ignore_index=True)
    return metrics, details, items, gate_histograms(module, attributes, test), timings


def run(params: Params, inputs: Inputs) -> EvalRun:
    t0 = time.perf_counter()
    p = params.eval_steering
    torch.manual_seed(params.seed)
    module, config = load_steering(inputs.checkpoint)
    missing = {"bandwidths", "scale", "probe_cs"} - set(config.training)
    if missing:
        raise ValueError(f"{inputs.checkpoint}/config.json lacks training {sorted(missing)} "
                         "(written by an older train_steering): re-run train_steering")
    tables = {task: pd.read_parquet(inputs.attributes / f"{task}.parquet") for task in TASKS}
    acts, labels, splits, kvs = load_all_activations(inputs.activations, TASKS)
    for task, kv in kvs.items():
        if int(kv.get("layer", -1)) != config.layer:
            raise ValueError(f"{task} activations are from layer {kv.get('layer')} but the "
                             f"checkpoint is for layer {config.layer}: re-run the pipeline")
    model, tokenizer = load_causal_lm(config.model, p.dtype)
    check_compatible(config, model.config.hidden_size, len(decoder_layers(model)))
    metrics, details, items, hist, seconds = evaluate_all(
        model, tokenizer, tables, acts, labels, splits, module, config.layer, config.attributes,
        config.training, p, params.seed)
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
