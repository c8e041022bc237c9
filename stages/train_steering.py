"""Stage train_steering: data/activations -> models/mat_steer/ + dvclive curves.

Trains the gated MAT-Steer module on the union of the attributes' train splits with the objective
`train_steering.objective` ("seed": the published losses; "targeted": sparsity only on the gates
of attributes an example does not violate, summed-bandwidth MMD; see losses.py); the epoch kept is
the one with the lowest dev objective (test is never read here).
dvclive logs, per epoch, the training losses (train/*) and the dev objective and per-attribute
gate diagnostics (dev/*) to reports/train_steering/ (see `dvc plots show`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from dvclive import Live

from steerline.io import atomic_dir
from steerline.mat_steer.activations import load_activations
from steerline.mat_steer.data import TASKS
from steerline.mat_steer.losses import LossWeights
from steerline.mat_steer.module import SteeringConfig, save_steering
from steerline.mat_steer.train import TrainConfig, split_pos_neg, train_mat_steer
from steerline.params import Params, load_params

ACTIVATIONS = Path("data/activations")
OUT = Path("models/mat_steer")
LIVE = Path("reports/train_steering")
log = logging.getLogger("train_steering")


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


def load_all(directory: Path) -> tuple[dict, dict, dict, dict[str, str]]:
    acts, labels, splits, metas = {}, {}, {}, {}
    for task in TASKS:
        a, meta, kv = load_activations(directory, task)
        acts[task], labels[task] = a, meta["label"].to_numpy()
        splits[task] = meta["split"].to_numpy()
        metas[task] = kv
    layers = {m.get("layer") for m in metas.values()}
    models = {m.get("model") for m in metas.values()}
    if len(layers) != 1 or len(models) != 1:
        raise ValueError(f"attributes were extracted at different layers/models {layers} {models}:"
                         " re-run extract_activations")
    return acts, labels, splits, metas[TASKS[0]]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    cfg = train_config(params)
    acts, labels, splits, meta = load_all(ACTIVATIONS)
    train = split_pos_neg(acts, labels, splits, "train")
    dev = split_pos_neg(acts, labels, splits, "dev")
    with atomic_dir(LIVE) as live_dir:
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
        best_row = result.history[result.best_epoch]
        for k, v in best_row.items():
            if k.startswith("dev/") and np.isfinite(v):
                *parents, leaf = k.split("/")  # dvclive nests metric names at "/"
                node = live.summary
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = v
        live.end()
    training = {
        "objective": cfg.objective, "gate_init": cfg.gate_init, "probe_cs": list(cfg.probe_cs),
        "mmd_weighting": cfg.mmd_weighting, "gate_target": cfg.gate_target,
        "gate_temperatures": dict(zip(TASKS, result.gate_temperatures, strict=True)),
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
    config = SteeringConfig(attributes=list(TASKS), layer=int(meta["layer"]),
                            hidden_size=int(meta["hidden_size"]), model=meta["model"],
                            training=training)
    save_steering(result.module, config, OUT)
    best = result.history[result.best_epoch]
    log.info("best epoch %d of %d (dev loss %.4f); dev gate AUROC %s; %.1f s", result.best_epoch,
             result.epochs_run, best["dev/loss/total"],
             {t: round(best[f"dev/{t}/gate_auroc"], 3) for t in TASKS}, time.perf_counter() - t0)


if __name__ == "__main__":
    from steerline.stage_main import run_stage

    run_stage(main)
