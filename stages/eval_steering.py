"""Stage eval_steering: base vs mean-difference baseline vs MAT-Steer on each task's test split.

Metrics (reports/mat_steer_eval.json, DVC metrics): TruthfulQA MC1/MC2, BBQ accuracy, ToxiGen
accuracy for the unsteered model, the mean-difference baseline (sum over attributes of
mean(pos) - mean(neg) of the train activations, times a scale chosen on dev) and MAT-Steer, each
applied by a hook at the checkpoint's layer to every token; plus per-attribute gate diagnostics on
the test activations. Details (scale sweep, item counts, timings) go to
reports/mat_steer_eval_details.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steerline.io import write_json
from steerline.mat_steer.activations import load_activations
from steerline.mat_steer.data import TASKS, task_rng
from steerline.mat_steer.diagnostics import attribute_diagnostics
from steerline.mat_steer.evaluate import METRICS, evaluate_condition, task_items
from steerline.mat_steer.hooks import additive_fn, mat_steer_fn
from steerline.mat_steer.module import SteeringModule, check_compatible, load_steering
from steerline.mat_steer.train import mean_difference_vectors, split_pos_neg
from steerline.model.arch import decoder_layers
from steerline.model.load import load_causal_lm
from steerline.params import EvalSteering, load_params

ATTRIBUTES = Path("data/attributes")
ACTIVATIONS = Path("data/activations")
CHECKPOINT = Path("models/mat_steer")
METRICS_OUT = Path("reports/mat_steer_eval.json")
DETAILS_OUT = Path("reports/mat_steer_eval_details.json")
log = logging.getLogger("eval_steering")


def gate_report(module: SteeringModule, attributes: list[str], test: dict, bandwidth: float
                ) -> dict[str, dict[str, float]]:
    return {name: attribute_diagnostics(module, t, test[name].pos, test[name].neg, bandwidth)
            for t, name in enumerate(attributes)}


def evaluate_all(model: torch.nn.Module, tokenizer, tables: dict[str, pd.DataFrame],
                 acts: dict, labels: dict, splits: dict, module: SteeringModule, layer: int,
                 attributes: list[str], bandwidth: float, p: EvalSteering, seed: int
                 ) -> tuple[dict, dict]:
    """Pure given the model: (metrics, details)."""
    timings: dict[str, float] = {}
    test_items = {t: task_items(tables[t], "test") for t in TASKS}
    dev_items = {t: task_items(tables[t], "dev", p.max_dev_items, task_rng(seed, t + ":dev"))
                 for t in TASKS}

    def run(name: str, items: dict, fn) -> dict[str, float]:
        t0 = time.perf_counter()
        out = evaluate_condition(model, tokenizer, items, layer, fn, p.max_rows, name)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s (%.0f s)", name, {k: round(v, 4) for k, v in out.items()},
                 timings[name])
        return out

    base = run("base", test_items, None)
    train = split_pos_neg(acts, labels, splits, "train")
    direction = mean_difference_vectors({a: train[a] for a in attributes}).sum(0)  # [D]
    sweep = {}
    for scale in p.mean_diff_scales:
        dev = run(f"mean_diff dev x{scale:g}", dev_items, additive_fn(scale * direction))
        sweep[f"{scale:g}"] = {**dev, "mean": float(np.mean([dev[k] for k in METRICS]))}
    best_scale = max(p.mean_diff_scales, key=lambda s: sweep[f"{s:g}"]["mean"])
    mean_diff = run("mean_diff", test_items, additive_fn(best_scale * direction))
    mat = run("mat_steer", test_items, mat_steer_fn(module))
    test = split_pos_neg(acts, labels, splits, "test")
    gates = gate_report(module, attributes, test, bandwidth)
    metrics = {"base": base, "mean_diff": mean_diff, "mat_steer": mat, "gates": gates}
    details = {
        "layer": layer, "mean_diff_scale": best_scale, "mean_diff_dev_sweep": sweep,
        "mean_diff_direction_norm": float(direction.norm()),
        "steering_vector_norms": dict(zip(attributes,
                                          module.steering_vectors.norm(dim=1).tolist(),
                                          strict=True)),
        "n_test_items": {t: len(v) for t, v in test_items.items()},
        "n_dev_items": {t: len(v) for t, v in dev_items.items()},
        "seconds": timings,
    }
    return metrics, details


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    p = params.eval_steering
    torch.manual_seed(params.seed)
    module, config = load_steering(CHECKPOINT)
    tables, acts, labels, splits = {}, {}, {}, {}
    for task in TASKS:
        tables[task] = pd.read_parquet(ATTRIBUTES / f"{task}.parquet")
        a, meta, kv = load_activations(ACTIVATIONS, task)
        if int(kv.get("layer", -1)) != config.layer:
            raise ValueError(f"{task} activations are from layer {kv.get('layer')} but the "
                             f"checkpoint is for layer {config.layer}: re-run the pipeline")
        acts[task], labels[task] = a, meta["label"].to_numpy()
        splits[task] = meta["split"].to_numpy()
    model, tokenizer = load_causal_lm(config.model, p.dtype)
    check_compatible(config, model.config.hidden_size, len(decoder_layers(model)))
    metrics, details = evaluate_all(model, tokenizer, tables, acts, labels, splits, module,
                                    config.layer, config.attributes,
                                    float(config.training["bandwidth"]), p, params.seed)
    details["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    write_json(metrics, METRICS_OUT)
    write_json(details, DETAILS_OUT)
    log.info("gate AUROC %s; done in %.0f s",
             {k: round(v["gate_auroc"], 3) for k, v in metrics["gates"].items()},
             details["seconds"]["total"])


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"eval_steering: {err}") from None
