"""train_steering's run: the train and dev splits of every attribute's activations -> a trained
MAT-Steer module, its checkpoint config and per-epoch dvclive curves.

Trains the gated MAT-Steer module on the union of the attributes' train splits with the objective
`train_steering.objective` ("seed": the published losses; "targeted": sparsity only on the gates
of attributes an example does not violate, summed-bandwidth MMD; see mat_steer/losses.py).
`run` trains, logging each epoch to the dvclive folder (published atomically when training ends),
then saves the checkpoint (atomically too); the epoch kept is the one with the lowest dev
objective (test is never read here). dvclive logs, per epoch, the training losses (train/*) and
the dev objective and per-attribute gate diagnostics (dev/*) (see `dvc plots show`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dvclive import Live

from steerline.core.io import atomic_dir
from steerline.core.params import Params
from steerline.mat_steer.activations import PosNeg, load_all_activations, split_pos_neg
from steerline.mat_steer.checkpoint import SteeringConfig, save_steering
from steerline.mat_steer.losses import LossWeights
from steerline.mat_steer.train import TrainConfig, TrainResult, train_mat_steer

log = logging.getLogger("train_steering")


@dataclass(frozen=True)
class Inputs:
    activations: Path  # folder: {task}.npy + {task}.parquet


@dataclass(frozen=True)
class Outputs:
    checkpoint: Path  # safetensors + config.json
    live: Path  # dvclive: metrics.json (the kept epoch's dev metrics) and plots/


@dataclass
class TrainRun:
    result: TrainResult
    config: SteeringConfig
    seconds: float


def train_config(params: Params) -> TrainConfig:
    p = params.train_steering
    targeted = p.objective == "targeted"  # "seed": random gates, plain MMD average (published)
    weights = LossWeights(mmd=params.lambda_mmd, sparse=params.lambda_sparse,
                          ortho=params.lambda_ortho, pos=params.lambda_pos,
                          gate=params.lambda_gate)
    return TrainConfig(lr=p.lr, batch_size=p.batch_size, epochs=p.epochs, sigma=p.sigma,
                       weights=weights, scale=p.scale, patience=p.patience,
                       init_scale=p.init_scale, seed=params.seed, objective=p.objective,
                       bandwidths=tuple(p.bandwidths),
                       gate_init="probe" if targeted else "random",
                       mmd_weighting="relative" if targeted else "equal",
                       gate_target=p.gate_target if targeted else None,
                       probe_cs=tuple(p.probe_cs))


def load_splits(directory: Path, attributes: list[str]
                ) -> tuple[dict[str, PosNeg], dict[str, PosNeg], dict[str, str]]:
    """(train, dev) pos / neg activations per attribute (in the order of `attributes`) and the
    extraction's key-value metadata; one error when the attributes come from different layers or
    models."""
    acts, labels, splits, metas = load_all_activations(directory, attributes)
    layers = {m.get("layer") for m in metas.values()}
    models = {m.get("model") for m in metas.values()}
    if len(layers) != 1 or len(models) != 1:
        raise ValueError(f"attributes were extracted at different layers/models {layers} {models}:"
                         " re-run extract_activations")
    return (split_pos_neg(acts, labels, splits, "train"),
            split_pos_neg(acts, labels, splits, "dev"), metas[attributes[0]])


def run(params: Params, inputs: Inputs, out: Outputs) -> TrainRun:
    """Train on the train split (the epoch kept is the lowest dev objective; test is never read),
    logging train/* and dev/* per epoch to `out.live`, then save the checkpoint."""
    t0 = time.perf_counter()
    cfg = train_config(params)
    attributes = params.attribute_names
    train, dev, meta = load_splits(inputs.activations, attributes)
    with atomic_dir(out.live) as live_dir:
        result = _train_logged(train, dev, cfg, live_dir)
    config = SteeringConfig(attributes=attributes, layer=int(meta["layer"]),
                            hidden_size=int(meta["hidden_size"]), model=meta["model"],
                            training=_training_record(cfg, result, meta, train))
    save_steering(result.module, config, out.checkpoint)
    return TrainRun(result, config, time.perf_counter() - t0)


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    trained = run(params, inputs, out)
    r = trained.result
    best = r.history[r.best_epoch]
    log.info("best epoch %d of %d (dev loss %.4f); dev gate AUROC %s", r.best_epoch,
             r.epochs_run, best["dev/loss/total"],
             {t: round(best[f"dev/{t}/gate_auroc"], 3) for t in trained.config.attributes})


def _train_logged(train: dict[str, PosNeg], dev: dict[str, PosNeg], cfg: TrainConfig,
                  live_dir: Path) -> TrainResult:
    live = Live(dir=str(live_dir), report=None, save_dvc_exp=False, dvcyaml=False)

    def on_epoch(_epoch: int, train_means: dict, dev_out: dict) -> None:
        for k, v in {**train_means, **dev_out}.items():
            if np.isfinite(v):
                live.log_metric(k, v)
        live.next_step()

    result = train_mat_steer(train, dev, cfg, on_epoch=on_epoch)
    live.summary["best_epoch"] = result.best_epoch
    live.summary["epochs_run"] = result.epochs_run
    # metrics.json describes the kept (best-epoch) module, not the last epoch
    for k, v in result.history[result.best_epoch].items():
        if k.startswith("dev/") and np.isfinite(v):
            *parents, leaf = k.split("/")  # dvclive nests metric names at "/"
            node = live.summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = v
    live.end()
    return result


def _training_record(cfg: TrainConfig, result: TrainResult, meta: dict[str, str],
                     train: dict[str, PosNeg]) -> dict[str, Any]:
    """What the checkpoint's config.json says about its training (eval_steering reads the
    bandwidths, scale and probe_cs)."""
    return {
        "objective": cfg.objective, "gate_init": cfg.gate_init, "probe_cs": list(cfg.probe_cs),
        "mmd_weighting": cfg.mmd_weighting, "gate_target": cfg.gate_target,
        "gate_temperatures": dict(zip(train, result.gate_temperatures, strict=True)),
        "lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "sigma": cfg.sigma,
        "scale_mode": cfg.scale, "scale": result.scale, "bandwidths": list(result.bandwidths),
        "lambda_mmd": cfg.weights.mmd, "lambda_sparse": cfg.weights.sparse,
        "lambda_ortho": cfg.weights.ortho, "lambda_pos": cfg.weights.pos,
        "lambda_gate": cfg.weights.gate,
        "patience": cfg.patience, "init_scale": cfg.init_scale, "seed": cfg.seed,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "pooling": meta.get("pooling"),
        "n_train": {k: [len(v.pos), len(v.neg)] for k, v in train.items()},
    }
