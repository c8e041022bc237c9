"""This process's place in a data-parallel finetuning run, and joining torchrun's process group."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from steerline.steermoe.data.sft import SftExample, collate


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel run (built by `init_replica`)."""

    strategy: str  # "ddp" | "fsdp"
    rank: int
    world: int
    device: torch.device

    def local_batch(self, batch: Sequence[SftExample], batch_size: int, pad_id: int
                    ) -> tuple[dict[str, torch.Tensor], int]:
        """This rank's share of a global batch, collated on its device, and the global batch's
        answer-token count (the loss divisor). A rank whose share of a short last batch is empty
        runs one example with every label ignored: it adds exactly zero to the loss and the
        gradients but still joins FSDP's collectives."""
        # labels are shifted inside the model: position 0 never carries a loss
        n_items = sum(len(e.input_ids) - max(e.n_prompt, 1) for e in batch)
        share = batch_size // self.world
        mine = list(batch[self.rank * share:(self.rank + 1) * share])
        if not mine:
            mine = [replace(batch[0], n_prompt=len(batch[0].input_ids))]
        return {k: v.to(self.device) for k, v in collate(mine, pad_id).items()}, n_items

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum over ranks, one collective per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])  # [sum of numels]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def init_replica(strategy: str) -> Replica:
    """Join the process group torchrun set up (env://)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Replica(strategy, dist.get_rank(), dist.get_world_size(), device)
