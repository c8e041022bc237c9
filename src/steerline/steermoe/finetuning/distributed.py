"""Data-parallel expert finetuning (finetune_experts.strategy: ddp | fsdp) over torch.distributed.

The caller (the stage) keeps its single-process model and calls `train_slices_distributed`: it
writes a JSON job (model directory, experts, config, token ids of the SFT examples: no pickle),
launches `num_processes` workers with `torch.distributed.run` (torchrun) running this module,
and, once they exit, writes the trained slices (rank 0's `slices.safetensors`) into its own model
and replays the loss history through `on_step`. So the caller stays the one writer of the
stage's outputs; inside the run, rank 0 is the one writer of checkpoints and of the result.

Each global batch (the single-process schedule, `batch_size` examples) is split into contiguous
shares of batch_size / N examples, one per rank. Every rank's loss is its answer tokens' summed
cross-entropy divided by the GLOBAL batch's answer-token count, so the summed (not averaged)
gradients equal the single-process mean-loss gradient up to float rounding; the optimizer
(AdamW on the listed slices only, tiny) is replicated and steps identically on every rank.
  ddp:  full model per rank; one all-reduce of the listed slices' gradients per step (torch's
        DDP wrapper would all-reduce whole fused [E, ...] tensors, every expert of the layer).
  fsdp: torch FSDP2 `fully_shard` per decoder layer: parameters sharded on the expert dim,
        gradients reduce-scattered (summed); the listed rows are gathered for the optimizer.
Backend: nccl when CUDA is available (rank i on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from torch import nn

from steerline.core.io import read_json, save_safetensors, write_json
from steerline.steermoe.data.sft import SftExample
from steerline.steermoe.finetuning.expert_slices import (
    SLICES_FORMAT,
    ExpertSlices,
    apply_expert_slices,
)
from steerline.steermoe.finetuning.finetune import TrainConfig, TrainResult, train_slices
from steerline.steermoe.finetuning.replica import Replica, init_replica

log = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp")


def check_world(strategy: str, num_processes: int, batch_size: int) -> None:
    """One clear error for a strategy / process count / batch size that do not fit together."""
    if strategy not in STRATEGIES:
        raise ValueError(f"finetune_experts.strategy {strategy!r} is not one of {STRATEGIES}")
    if num_processes < 1:
        raise ValueError("finetune_experts.num_processes must be >= 1")
    if strategy == "single" and num_processes != 1:
        raise ValueError(f"finetune_experts.num_processes is {num_processes} but strategy is "
                         "single: set strategy ddp (or fsdp), or num_processes 1")
    if batch_size % num_processes:
        raise ValueError(f"finetune_experts.batch_size {batch_size} is not divisible by "
                         f"num_processes {num_processes}: each process takes batch_size / "
                         "num_processes examples of every global batch")


def shard_fsdp(model: nn.Module, replica: Replica) -> None:
    """FSDP2: one shard group per decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from steerline.model.arch import decoder_layers

    mesh = init_device_mesh(replica.device.type, (replica.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The loss is already divided by the global token count: sum the ranks' gradients (FSDP
    # averages by default). Per shard group, so on every FSDP module, not only the root; a plain
    # SUM collective, as gloo has no PREMUL_SUM.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# ---- the launching side ----------------------------------------------------------------------

def train_slices_distributed(
    model: nn.Module,
    model_path: str | Path,
    examples: Sequence[SftExample],
    experts: Sequence[Sequence[int]],
    cfg: TrainConfig,
    pad_id: int,
    strategy: str,
    num_processes: int,
    checkpoint_dir: Path | None = None,
    model_tag: str = "",
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """`train_slices` on `num_processes` torchrun workers that each load `model_path` (the same
    weights as `model`); the trained slices are then written into `model` in place."""
    check_world(strategy, num_processes, cfg.batch_size)
    if strategy == "single":
        raise ValueError("strategy single runs train_slices in this process")
    ExpertSlices(model, experts)  # bad experts fail here, before any worker starts
    with tempfile.TemporaryDirectory(prefix="finetune_dist_") as tmp:
        job = Path(tmp) / "job.json"
        write_json({
            "model": str(model_path), "strategy": strategy,
            # the workers load the weights in the dtype `model` has (finetune_experts.dtype)
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "experts": [list(e) for e in experts],
            "cfg": asdict(cfg), "pad_id": pad_id,
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
            "model_tag": model_tag, "stop_after": stop_after, "result_dir": tmp,
            "examples": [[e.prompt_id, e.kind, list(e.input_ids), e.n_prompt] for e in examples],
        }, job)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={num_processes}", "-m",
               "steerline.steermoe.finetuning.distributed", str(job)]
        log.info("launching %d %s workers: %s", num_processes, strategy, " ".join(cmd))
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            raise RuntimeError(f"the {strategy} finetuning workers failed (exit {rc}): see their "
                               "log above; strategy single runs without torch.distributed")
        res = read_json(Path(tmp) / "result.json")
        apply_expert_slices(model, Path(tmp) / "slices.safetensors")
    if on_step is not None:
        for h in res["history"]:
            on_step(h)
    return TrainResult(history=res["history"], steps=res["steps"],
                       resumed_from=res["resumed_from"])


# ---- the worker side: torchrun runs `python -m steerline.steermoe.finetuning.distributed JOB` --

def worker(job_path: Path) -> None:
    from steerline.model.load import load_moe

    job = read_json(job_path)
    replica = init_replica(job["strategy"])
    try:
        if replica.strategy == "fsdp":
            # loaded on the host: fully_shard moves only this rank's shards to the device
            model, _ = load_moe(job["model"], job["dtype"], device="cpu")
            shard_fsdp(model, replica)
        else:  # straight to this rank's device: no host copy per worker
            model, _ = load_moe(job["model"], job["dtype"], device=str(replica.device))
        examples = [SftExample(p, k, tuple(ids), n) for p, k, ids, n in job["examples"]]
        cfg = TrainConfig(**job["cfg"])
        ckpt = job["checkpoint_dir"]
        # a checkpoint resumes only a run of the same strategy and world size
        tag = f"{job['model_tag']}|{replica.strategy}:{replica.world}"
        result = train_slices(
            model, examples, job["experts"], cfg, job["pad_id"],
            checkpoint_dir=None if ckpt is None else Path(ckpt), model_tag=tag,
            stop_after=job["stop_after"], replica=replica)
        slices = ExpertSlices(model, job["experts"])
        tensors = slices.state_tensors()  # every rank: a collective under FSDP
        if replica.rank == 0:  # the one writer
            out = Path(job["result_dir"])
            save_safetensors(tensors, out / "slices.safetensors", {
                "format": SLICES_FORMAT, "experts": json.dumps([list(p) for p in slices.experts])})
            write_json({"history": result.history, "steps": result.steps,
                        "resumed_from": result.resumed_from}, out / "result.json")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    worker(Path(sys.argv[1]))
