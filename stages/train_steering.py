"""Stage train_steering: data/activations -> models/mat_steer/ + dvclive curves.

Trains the gated MAT-Steer module on the union of the attributes' train splits with the objective
`train_steering.objective` ("seed": the published losses; "targeted": sparsity only on the gates
of attributes an example does not violate, summed-bandwidth MMD; see losses.py); the epoch kept is
the one with the lowest dev objective (test is never read here; steerline.pipeline.train_steering).
dvclive logs, per epoch, the training losses (train/*) and the dev objective and per-attribute
gate diagnostics (dev/*) to reports/train_steering/ (see `dvc plots show`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from steerline.core.params import load_params
from steerline.mat_steer.data import TASKS
from steerline.pipeline import train_steering as train_run

ACTIVATIONS = Path("data/activations")
OUTPUTS = train_run.Outputs(checkpoint=Path("models/mat_steer"),
                            live=Path("reports/train_steering"))
log = logging.getLogger("train_steering")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    done = train_run.run(load_params(), ACTIVATIONS, OUTPUTS)
    r = done.result
    best = r.history[r.best_epoch]
    log.info("best epoch %d of %d (dev loss %.4f); dev gate AUROC %s; %.1f s", r.best_epoch,
             r.epochs_run, best["dev/loss/total"],
             {t: round(best[f"dev/{t}/gate_auroc"], 3) for t in TASKS}, done.seconds)


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(main)
