"""Selective expert finetuning (SteerMoE): train only the MLP slices of the listed experts.

Loop (`train_slices`): HF Trainer's schedule (linear warmup then linear decay as in
`get_linear_schedule_with_warmup`, grad-norm clip, AdamW), a seeded shuffle per epoch,
transformers' per-expert "eager" experts loop (grouped_mm's backward is not deterministic on CPU:
two runs differ from the second update on), a tqdm bar, a per-step callback (dvclive), and
resumable checkpoints written atomically as safetensors (slices + optimizer state) + JSON (step,
loss history): no pickle. HF Trainer itself is not used because its checkpoints pickle the
optimizer and RNG states.

Data-parallel runs (strategy ddp | fsdp, steerline.steermoe.finetuning.distributed) go through
the same loop with a `Replica`: each rank runs its share of the global batch, gradients are
summed over ranks, rank 0 alone writes checkpoints and shows progress. Without one (strategy
single) the loop is exactly the single-process one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from steerline.core.faults import kill_point
from steerline.core.io import atomic_dir, read_json, write_json
from steerline.steermoe.data.sft import SftExample, collate
from steerline.steermoe.finetuning.expert_slices import ExpertSlices

if TYPE_CHECKING:
    from steerline.steermoe.finetuning.replica import Replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """finetune_experts' values come from params.yaml; no defaults here to drift from them."""

    lr: float
    epochs: int
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float  # 0 = no clipping
    checkpoint_every: int  # steps; 0 = only at the end of each epoch
    seed: int


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one entry per optimizer step: step, epoch, loss, lr
    steps: int
    resumed_from: int


def linear_warmup_lr(step: int, total: int, warmup: int, lr: float) -> float:
    """HF `get_linear_schedule_with_warmup` at `step` (0-based): 0 -> lr over `warmup` steps,
    then linearly to 0 at `total`."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _run_key(slices: ExpertSlices, examples: Sequence[SftExample], cfg: TrainConfig,
             model_tag: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([slices.experts, asdict(cfg), model_tag]).encode())
    for e in examples:
        h.update(json.dumps([e.prompt_id, e.n_prompt, list(e.input_ids)]).encode())
    return h.hexdigest()[:16]


class _Checkpoint:
    """Resumable state in `directory`: slices.safetensors, optimizer.safetensors, state.json."""

    def __init__(self, directory: Path, key: str) -> None:
        self.dir = directory
        self.key = key

    def load(self, slices: ExpertSlices, opt: torch.optim.Optimizer, proxies: list[torch.Tensor]
             ) -> tuple[int, list[dict[str, float]]] | None:
        state_path = self.dir / "state.json"
        if not state_path.is_file():
            return None
        state = read_json(state_path)
        if state.get("key") != self.key:
            log.info("checkpoint in %s is for another run: starting afresh", self.dir)
            return None
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(self.dir / "slices.safetensors"), "pt") as f:
            values = [f.get_tensor(f"slice.{i}") for i in range(len(proxies))]
        with safe_open(str(self.dir / "optimizer.safetensors"), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        opt_state = {
            "state": {
                i: {"step": tensors[f"{i}.step"], "exp_avg": tensors[f"{i}.exp_avg"],
                    "exp_avg_sq": tensors[f"{i}.exp_avg_sq"]}
                for i in range(len(proxies)) if f"{i}.exp_avg" in tensors
            },
            "param_groups": state["param_groups"],
        }
        slices.write(values)
        with torch.no_grad():
            for p, v in zip(proxies, values, strict=True):
                p.copy_(v)
        opt.load_state_dict(opt_state)
        return int(state["step"]), list(state["history"])

    def save(self, step: int, history: list[dict[str, float]], opt: torch.optim.Optimizer,
             proxies: list[torch.Tensor]) -> None:
        """The whole checkpoint directory is replaced at once (a kill leaves the old one)."""
        sd = opt.state_dict()
        tensors = {}
        for i, st in sd["state"].items():
            for k in ("step", "exp_avg", "exp_avg_sq"):
                t = st[k] if torch.is_tensor(st[k]) else torch.tensor(st[k])
                tensors[f"{i}.{k}"] = t.cpu().contiguous()  # GPU runs: saved from host memory
        with atomic_dir(self.dir) as tmp:
            save_file({f"slice.{i}": p.detach().cpu().contiguous()
                       for i, p in enumerate(proxies)},
                      str(tmp / "slices.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json({"key": self.key, "step": step, "history": history,
                        "param_groups": sd["param_groups"]}, tmp / "state.json")


def train_slices(
    model: nn.Module,
    examples: Sequence[SftExample],
    experts: Sequence[Sequence[int]],
    cfg: TrainConfig,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    model_tag: str = "",
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """Fine-tune the listed experts' slices of `model` in place on `examples`.

    With `checkpoint_dir`, the run resumes from the last complete checkpoint of the same run
    (same experts, data, config and model tag) and replays its loss history through `on_step`
    first. `stop_after` (tests) stops after that many total steps, as a kill would. With a
    `replica` (a torchrun worker), this rank trains on its share of each global batch."""
    if not examples:
        raise ValueError("no SFT examples")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise ValueError("finetune batch_size and epochs must be >= 1")
    if replica is not None and getattr(model.config, "output_router_logits", False):
        # the load-balancing loss is a product of batch-wide routing rates: not a sum over ranks
        raise ValueError("the model's config sets output_router_logits (a router aux loss): "
                         "finetune_experts.strategy ddp/fsdp needs it off, or use strategy single")
    writer = replica is None or replica.rank == 0  # checkpoints and progress: one process
    slices = ExpertSlices(model, experts)
    trainable = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    experts_impl = model.get_experts_implementation()
    try:  # hooks, frozen flags and the experts implementation are restored whatever happens
        # the per-expert loop: grouped_mm's backward is not deterministic on CPU
        model.set_experts_implementation("eager")
        slices.freeze(model)
        # what AdamW sees: float32 master copies of the slices (the same tensors for a float32
        # model), written back in the model's dtype after each step
        proxies = [v.float().requires_grad_(True) for v in slices.values()]
        opt = torch.optim.AdamW(proxies, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        total = per_epoch * cfg.epochs
        warmup = math.ceil(cfg.warmup_ratio * total)
        ckpt = (_Checkpoint(checkpoint_dir, _run_key(slices, examples, cfg, model_tag))
                if checkpoint_dir is not None else None)
        start, history = 0, []
        if ckpt is not None:
            loaded = ckpt.load(slices, opt, proxies)
            if loaded is not None:
                start, history = loaded
                log.info("resuming expert finetuning at step %d of %d", start, total)
        if on_step is not None:
            for h in history:
                on_step(h)
        model.train()
        bar = tqdm(range(start, total), total=total, initial=start, desc="finetune experts",
                   unit="step", disable=not writer)
        for step in bar:
            if stop_after is not None and step >= stop_after:
                break
            epoch, b = divmod(step, per_epoch)
            order = epoch_order(len(examples), epoch, cfg.seed)
            picked = [examples[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            lr = linear_warmup_lr(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            slices.zero_grad()
            if replica is None:
                out = model(**collate(picked, pad_id), use_cache=False)
                out.loss.backward()
                loss, grads = out.loss.detach(), slices.grads()
            else:
                loss, grads = _replica_step(model, slices, picked, cfg.batch_size, pad_id,
                                            replica)
            for p, g in zip(proxies, grads, strict=True):
                p.grad = g.to(p.dtype)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(proxies, cfg.max_grad_norm)
            opt.step()
            slices.write([p.detach() for p in proxies])
            rec = {"step": step + 1, "epoch": epoch + (b + 1) / per_epoch,
                   "loss": float(loss), "lr": lr}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if on_step is not None:
                on_step(rec)
            done = step + 1
            if ckpt is not None and writer and (
                done == total or b == per_epoch - 1
                or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            ):
                ckpt.save(done, history, opt, proxies)
                kill_point(f"finetune:checkpoint:{done}")
    finally:
        slices.unfreeze_hooks()
        slices.zero_grad()
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
        model.set_experts_implementation(experts_impl)
        model.train(was_training)
    return TrainResult(history=history, steps=len(history), resumed_from=start)


def _replica_step(model: nn.Module, slices: ExpertSlices, batch: list[SftExample],
                  batch_size: int, pad_id: int, replica: Replica
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward/backward of this rank's share; returns the global batch's mean loss and the
    listed slices' gradients summed over ranks (= the single-process step's, to rounding)."""
    local, n_items = replica.local_batch(batch, batch_size, pad_id)
    # summed token losses / the global batch's answer-token count: the ranks' terms add up to
    # the single process's mean
    out = model(**local, use_cache=False, num_items_in_batch=n_items)
    out.loss.backward()
    loss = out.loss.detach().float().reshape(1)  # [1]
    grads = slices.grads()  # [n listed rows, ...] each; under FSDP already summed over ranks
    replica.sum_(grads + [loss] if replica.strategy == "ddp" else [loss])
    return loss[0], grads

