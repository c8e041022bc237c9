"""Stage capture_routing: an MoE + the detect-split safety prompts -> per-token routing shards and
the greedy answers, through the backend the params name (vLLM by default). One stage definition
serves the base and the fine-tuned model (dvc.yaml's foreach)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steerline.core.params import Params
from steerline.steermoe.data.safety import (
    check_prompt_texts,
    detection_prompts,
    read_safety_prompts,
)
from steerline.steermoe.routing.capture import CaptureConfig
from steerline.steermoe.routing.capture_model import capture_model


@dataclass(frozen=True)
class Inputs:
    model: str  # a local MoE directory (recorded as given in the routing metadata)
    prompts: Path  # safety.parquet; only its detect split is read


@dataclass(frozen=True)
class Outputs:
    routing: Path  # routing shards folder (+ manifest.json)
    generations: Path  # answers Parquet file
    cache: Path  # resumable shard cache folder (not a DVC output)


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.capture_routing
    # the whole table's splits checked; then the detect split of the detection sources only
    prompts = detection_prompts(read_safety_prompts(inputs.prompts))
    check_prompt_texts(prompts, str(inputs.prompts))
    vllm_options = dict(tensor_parallel_size=p.tensor_parallel_size,
                        gpu_memory_utilization=p.gpu_memory_utilization,
                        max_num_seqs=p.max_num_seqs, seed=params.seed)
    dp = int(p.data_parallel_size or 1)
    gens = capture_model(
        inputs.model,
        prompts,
        CaptureConfig(p.max_new_tokens, p.shard_prompts),
        out.routing,
        out.generations,
        out.cache,
        backend=p.backend,
        dtype=p.dtype,
        batch_size=p.batch_size,
        seed=params.seed,
        options=vllm_options if p.backend == "vllm" else {},
        processes=dp,
    )
    print(
        f"captured {len(gens)} prompts with {p.backend}"
        f"{f' ({dp} processes)' if dp > 1 else ''}, "
        f"{int(gens['n_generated_tokens'].sum())} generated tokens "
        f"({float(gens['finished'].mean()):.0%} stopped at end-of-turn)"
    )
