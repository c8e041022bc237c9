"""Stage finetune_experts: the base MoE + its selected experts + refusal SFT data -> a complete
fine-tuned model folder (plus trained_experts.json and expert_slices/trained_experts.safetensors:
only the trained slices, in a subfolder so that vLLM, which loads every *.safetensors file of a
model folder, does not read it as weights) and a dvclive loss curve.

Only the MLP slices of the unsafe experts in experts.json are trained (the first `max_experts`);
an empty list is an error unless `on_empty_selection: risk_diff_ranking`, which trains the top
`fallback_top_n` experts by risk_diff (regardless of q-value) instead, and trained_experts.json
says so. Training runs in this process, or with `strategy` ddp / fsdp on `num_processes` torchrun
workers (same global batch, gradients summed; steermoe/finetuning/distributed.py); this process
writes every output, and resumes from the checkpoints folder (safetensors + JSON) after a kill.

Before anything is published, the saved model is checked: every tensor outside the trained
slices is bit-identical to the base model on disk, and applying the slices file to the base
model reproduces the fine-tuned weights exactly.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from dvclive import Live
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.core.faults import kill_point
from steerline.core.io import atomic_dir, write_json, write_timings
from steerline.core.params import Params
from steerline.model.arch import moe_layers, moe_shape
from steerline.model.fingerprint import model_fingerprint
from steerline.model.load import load_moe
from steerline.steering.experts import Expert, expert_list, read_experts_json
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.data.sft import SftExample, build_sft_examples, end_of_turn_id
from steerline.steermoe.finetuning.distributed import train_slices_distributed
from steerline.steermoe.finetuning.expert_slices import (
    ExpertSlices,
    apply_expert_slices,
    compare_state_dicts,
    save_expert_slices,
)
from steerline.steermoe.finetuning.finetune import TrainConfig, TrainResult, train_slices
from steerline.steermoe.routing.manifest import read_generations

# inside the model folder, in a subfolder: vLLM loads every top-level *.safetensors as weights
SLICES = Path("expert_slices/trained_experts.safetensors")
log = logging.getLogger("finetune_experts")


@dataclass(frozen=True)
class Inputs:
    base_model: str  # the MoE (params.yaml `model`), recorded as given in trained_experts.json
    experts: Path  # experts.json: its unsafe list is trained
    risk_diff: Path  # the raw ranking (on_empty_selection: risk_diff_ranking)
    prompts: Path  # the safety prompts (detect split: SFT data)
    generations: Path  # the model's own answers, from the capture
    routing: Path  # its manifest vouches for `generations` (same capture)


@dataclass(frozen=True)
class Outputs:
    model: Path  # the fine-tuned model folder
    live: Path  # dvclive folder: the loss curve
    checkpoints: Path  # resumable training checkpoints (not a DVC output; removed on success)


class DiskTensors(Mapping[str, torch.Tensor]):
    """Every weight of a saved model directory (its top-level *.safetensors files), read one
    tensor at a time: comparing two real checkpoints holds two tensors, not two models. With
    `dtype`, floating tensors are cast to it as loading in that dtype casts them (a float32
    checkpoint fine-tuned in bfloat16 is compared as the bfloat16 model it trained)."""

    def __init__(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        self._dtype = dtype
        files = sorted(directory.glob("*.safetensors"))
        if not files:  # e.g. the folder is being rebuilt by another run: never compare with nothing
            raise ValueError(f"{directory} holds no *.safetensors weights: rebuild it (dvc repro)")
        self._file: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), "pt") as handle:
                self._file.update(dict.fromkeys(handle.keys(), str(f)))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._file[key], "pt") as handle:
            t = handle.get_tensor(key)
        return t.to(self._dtype) if self._dtype is not None and t.is_floating_point() else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)



@dataclass
class Run:
    """What training needs: the base model, its experts to train and the SFT examples."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    experts: list[Expert]
    source: str
    examples: list[SftExample]
    n_kind: dict[str, int]
    cfg: TrainConfig


def prepare(params: Params, inputs: Inputs) -> Run:
    p = params.finetune_experts
    torch.manual_seed(params.seed)
    # strategy single trains where the model loads (the GPU when there is one); ddp / fsdp
    # workers load their own copies, and this one, on the host, only takes the trained slices
    model, tokenizer = load_moe(inputs.base_model, p.dtype,
                                device=None if p.strategy == "single" else "cpu")
    # keys the checkpoints: a changed model restarts
    fingerprint = model_fingerprint(inputs.base_model)
    layers, (n_experts, _) = moe_layers(model), moe_shape(model)

    selection = read_experts_json(inputs.experts)
    picked_on = (selection.get("criteria") or {}).get("model")
    if picked_on and Path(picked_on).resolve() != Path(inputs.base_model).resolve():
        raise ValueError(f"{inputs.experts} was selected on {picked_on!r} but the model is "
                         f"{inputs.base_model!r}: rerun the detection stages on that model "
                         "(dvc repro)")
    if not selection["unsafe"] and p.on_empty_selection == "error":
        raise ValueError(f"{inputs.experts} lists no unsafe experts (select_experts kept none): "
                         "relax select_experts' thresholds, or set "
                         "finetune_experts.on_empty_selection: risk_diff_ranking to train the top "
                         "fallback_top_n of the raw risk_diff ranking regardless of q-value")
    fallback = None if selection["unsafe"] else pd.read_parquet(inputs.risk_diff)
    n = (p.max_experts or len(layers) * n_experts) if selection["unsafe"] else p.fallback_top_n
    experts, source = expert_list(selection, "unsafe", n, fallback, layers, n_experts)

    examples = build_sft_examples(
        tokenizer, read_safety_prompts(inputs.prompts),
        read_generations(inputs.generations, inputs.routing),
        end_of_turn_id(model), params.seed, p.max_unsafe, p.max_safe, p.max_length,
    )
    n_kind = {k: sum(e.kind == k for e in examples) for k in ("refusal", "own_answer")}
    log.info("training %d experts (%s) on %d refusal + %d own-answer examples", len(experts),
             source, n_kind["refusal"], n_kind["own_answer"])
    cfg = TrainConfig(lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                      warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
                      max_grad_norm=p.max_grad_norm, checkpoint_every=p.checkpoint_every,
                      seed=params.seed)
    return Run(model, tokenizer, fingerprint, experts, source, examples, n_kind, cfg)


def finetune(params: Params, inputs: Inputs, out_dir: Path, live_path: Path,
             checkpoints: Path, strategy: str, num_processes: int
             ) -> tuple[dict, TrainResult, float]:
    """Train, check and publish `out_dir` and the dvclive folder `live_path` (the stage's paths,
    or scratch ones for scripts/finetune_ddp_check.py); returns trained_experts.json's content,
    the training result and the training seconds."""
    run = prepare(params, inputs)
    model, tokenizer, fingerprint, experts, source, examples, n_kind, cfg = (
        run.model, run.tokenizer, run.fingerprint, run.experts, run.source, run.examples,
        run.n_kind, run.cfg)
    with atomic_dir(live_path) as live_dir:
        live = Live(dir=str(live_dir), report=None, save_dvc_exp=False, dvcyaml=False)

        def on_step(rec: dict[str, float]) -> None:
            live.step = int(rec["step"])
            live.log_metric("train/loss", rec["loss"])
            live.log_metric("train/lr", rec["lr"])

        t_train = time.perf_counter()
        if strategy == "single":
            result = train_slices(model, examples, experts, cfg, tokenizer.pad_token_id,
                                  checkpoint_dir=checkpoints, model_tag=fingerprint,
                                  on_step=on_step)
        else:  # workers load the base model themselves; the trained slices come back into `model`
            result = train_slices_distributed(
                model, inputs.base_model, examples, experts, cfg, tokenizer.pad_token_id, strategy,
                num_processes, checkpoint_dir=checkpoints, model_tag=fingerprint,
                on_step=on_step)
        train_seconds = time.perf_counter() - t_train
        losses = [h["loss"] for h in result.history]
        per_epoch = len(losses) // cfg.epochs
        live.summary["first_epoch_loss"] = sum(losses[:per_epoch]) / per_epoch
        live.summary["last_epoch_loss"] = sum(losses[-per_epoch:]) / per_epoch
        live.summary["steps"] = result.steps
        live.summary["n_experts_trained"] = len(experts)
        live.end()

    model.eval()
    slices = ExpertSlices(model, experts)
    info = {
        "experts": [list(e) for e in slices.experts],
        "n_experts": len(experts),
        "source": source,  # "experts.json" or "risk_diff_fallback"
        "slices_file": str(SLICES),
        "base_model": inputs.base_model,
        "base_model_fingerprint": fingerprint,
        "n_examples": n_kind,
        "training": {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                     "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
                     "max_grad_norm": cfg.max_grad_norm, "steps": result.steps,
                     "seed": params.seed},
        # only off the default, so strategy single's output stays as it was
        **({} if strategy == "single" else
           {"distributed": {"strategy": strategy, "num_processes": num_processes}}),
        "loss": {"first_epoch": round(sum(losses[:per_epoch]) / per_epoch, 4),
                 "last_epoch": round(sum(losses[-per_epoch:]) / per_epoch, 4)},
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_expert_slices(slices, tmp / SLICES,
                           {"source": source, "base_model": inputs.base_model})
        # Checks before publishing: frozen tensors bit-identical on disk; slices reproduce.
        base_disk = DiskTensors(Path(inputs.base_model),
                                getattr(torch, params.finetune_experts.dtype))
        tuned_disk = DiskTensors(tmp)
        frozen = compare_state_dicts(base_disk, tuned_disk, experts)
        del base_disk, tuned_disk
        rebuilt, _ = load_moe(inputs.base_model, params.finetune_experts.dtype, device="cpu")
        apply_expert_slices(rebuilt, tmp / SLICES)
        tuned_sd, rebuilt_sd = model.state_dict(), rebuilt.state_dict()
        reproduces = all(torch.equal(tuned_sd[k].cpu(), rebuilt_sd[k]) for k in tuned_sd)
        if not frozen["identical_outside_slices"] or not reproduces:
            raise RuntimeError(f"fine-tuned model failed its checks: frozen={frozen}, "
                               f"slices reproduce the model: {reproduces}")
        info["checks"] = {"frozen_identical_outside_slices": True,
                          "tensors_compared_on_disk": frozen["tensors_compared"],
                          "expert_tensors_changed_on_disk": frozen["changed_slices"],
                          "slices_reproduce_model": True}
        write_json(info, tmp / "trained_experts.json")
        kill_point("finetune:publish")
    return info, result, train_seconds


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    p = params.finetune_experts
    info, result, train_seconds = finetune(params, inputs, out.model, out.live, out.checkpoints,
                                           p.strategy, p.num_processes)
    shutil.rmtree(out.checkpoints, ignore_errors=True)
    # wall-clock figures and the resume point differ between runs: outside every DVC output
    write_timings("finetune_experts", {"train_seconds": train_seconds,
                                       "total_seconds": time.perf_counter() - t0,
                                       "resumed_from_step": result.resumed_from})
    log.info("trained %d experts in %d steps (loss %.3f -> %.3f); checks passed; %.1f s total",
             info["n_experts"], result.steps, info["loss"]["first_epoch"],
             info["loss"]["last_epoch"], time.perf_counter() - t0)
