"""CI check: the finetune_experts stage with strategy ddp on N processes (gloo on CPU, nccl on
GPUs) trains the same slices as the committed single-process models/moe_finetuned.

Runs the stage's own `finetune` (same data, experts, checks) into a scratch directory, then
compares every tensor outside the trained slices (bit-identical), the per-step losses and the
trained slices. One step agrees to float32 rounding (~1e-7); over the run's ~70 steps the
rounding grows (later routers see slightly different hidden states, and a near-tie top-k can flip),
so the slices are judged by `rel_diff_update`: the distance between the two runs relative to how
far training moved the slices (||ddp - single|| / ||single - base||), within --rel-tol (measured
0.018 at lr 4e-4), and the first step's loss (the base weights: the loss split over ranks) must
agree to 1e-5.
Prints one JSON line; exit status 1 when not ok.

Usage (after `dvc repro`): python scripts/finetune_ddp_check.py [--num-processes 2]
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerline.cli.stages import stage_argv
from steerline.core.io import read_json
from steerline.core.params import load_params
from steerline.model.load import load_moe
from steerline.pipeline.finetune_experts import SLICES, DiskTensors, Inputs, Outputs, finetune
from steerline.pipeline.stage import parse_paths
from steerline.steermoe.finetuning.distributed import check_world
from steerline.steermoe.finetuning.expert_slices import ExpertSlices, compare_state_dicts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--rel-tol", type=float, default=0.1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # the stage's own paths, as dvc.yaml's cmd gives them (run from the project root)
    inputs, stage_out = parse_paths([Inputs, Outputs], stage_argv("finetune_experts"))
    params = load_params()
    check_world("ddp", args.num_processes, params.finetune_experts.batch_size)
    committed = stage_out.model
    if not (committed / "trained_experts.json").is_file():
        sys.exit(f"{committed} not found: run `dvc repro finetune_experts` first")
    with tempfile.TemporaryDirectory(prefix="finetune_ddp_check_") as tmp:
        out = Path(tmp) / "moe_finetuned"
        info, result, _ = finetune(params, inputs, out, Path(tmp) / "live",
                                   Path(tmp) / "checkpoints", "ddp", args.num_processes)
        ref = read_json(committed / "trained_experts.json")
        same_experts = info["experts"] == ref["experts"]
        want, got = load_file(committed / SLICES), load_file(out / SLICES)
        frozen = compare_state_dicts(DiskTensors(committed), DiskTensors(out),
                                     ref["experts"])["identical_outside_slices"]
    diff = rel = None  # null when the two runs trained different experts (nothing to compare)
    if same_experts and set(want) == set(got):
        base = ExpertSlices(load_moe(inputs.base_model)[0], ref["experts"])
        start = base.state_tensors()  # the same keys as the slices files
        diff = max(float((want[k] - got[k]).abs().max()) for k in want)
        moved = torch.sqrt(sum(((want[k] - start[k]) ** 2).sum() for k in want))
        rel = float(torch.sqrt(sum(((want[k] - got[k]) ** 2).sum() for k in want)) / moved)
    single_loss = [float(line.split("\t")[1]) for line in (stage_out.live / "plots" / "metrics" /
                   "train" / "loss.tsv").read_text().splitlines()[1:]]
    ddp_loss = [h["loss"] for h in result.history]
    loss_diff = (max(abs(a - b) for a, b in zip(single_loss, ddp_loss, strict=True))
                 if len(single_loss) == len(ddp_loss) else None)
    first = abs(single_loss[0] - ddp_loss[0])
    ok = bool(same_experts and frozen and rel is not None and rel <= args.rel_tol
              and first <= 1e-5)
    print(json.dumps({"check": "finetune_ddp", "num_processes": args.num_processes,
                      "max_abs_diff_slices": diff, "rel_diff_update": rel,
                      "rel_tol": args.rel_tol, "max_abs_diff_loss": loss_diff,
                      "first_step_loss_diff": first,
                      "frozen_bit_identical": frozen, "ok": ok}))
    print("per-step loss diff: " + " ".join(f"{abs(a - b):.1e}" for a, b in
                                            zip(single_loss, ddp_loss, strict=False)),
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
