"""Stage finetune_experts: models/moe + models/experts.json + refusal SFT data ->
models/moe_finetuned/ (a complete model directory, plus trained_experts.json and
expert_slices/trained_experts.safetensors: only the trained slices, in a subfolder so that vLLM,
which loads every *.safetensors file of a model folder, does not read it as weights) and a dvclive
loss curve in reports/finetune_experts/.

Only the MLP slices of the unsafe experts in models/experts.json are trained (the first
`max_experts`); an empty list is an error unless `on_empty_selection: risk_diff_ranking`, which
trains the top `fallback_top_n` experts by risk_diff (regardless of q-value) instead, and
trained_experts.json says so. The run resumes from tmp/finetune_experts/ (safetensors + JSON
checkpoints) after a kill; the checks before publishing are in steerline.pipeline.finetune_experts.
`finetune_experts.strategy` ddp / fsdp trains on `num_processes` torchrun workers (same global
batch, gradients summed; steerline.steermoe.finetuning.distributed); this process writes every output.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from steerline.core.errors import run_stage
from steerline.core.io import write_timings
from steerline.core.params import load_params
from steerline.pipeline.finetune_experts import Inputs, finetune

INPUTS = Inputs(experts=Path("models/experts.json"), risk_diff=Path("reports/risk_diff.parquet"),
                prompts=Path("data/prompts/safety.parquet"),
                generations=Path("data/generations.parquet"), routing=Path("data/routing"))
OUT = Path("models/moe_finetuned")
LIVE = Path("reports/finetune_experts")
CHECKPOINTS = Path("tmp/finetune_experts")  # git-ignored; removed after a successful run

log = logging.getLogger("finetune_experts")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    p = params.finetune_experts
    info, result, train_seconds = finetune(params, INPUTS, OUT, LIVE, CHECKPOINTS,
                                           p.strategy, p.num_processes)
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    # wall-clock figures and the resume point differ between runs: outside every DVC output
    write_timings("finetune_experts", {"train_seconds": train_seconds,
                                       "total_seconds": time.perf_counter() - t0,
                                       "resumed_from_step": result.resumed_from})
    log.info("trained %d experts in %d steps (loss %.3f -> %.3f); checks passed; %.1f s total",
             info["n_experts"], result.steps, info["loss"]["first_epoch"],
             info["loss"]["last_epoch"], time.perf_counter() - t0)



if __name__ == "__main__":
    run_stage(main)
