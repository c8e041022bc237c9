"""Stage capture_routing: models/moe + detect-split safety prompts -> data/routing/ +
data/generations.parquet, through the backend the params name (vLLM by default).

The options point the same capture at another model and outputs (stage
capture_routing_finetuned: models/moe_finetuned -> data/routing_finetuned/); their defaults are
the paths above and `capture_routing.model`."""

import argparse
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer

from steerline.backends import make_backend
from steerline.core.errors import run_stage
from steerline.core.params import load_params
from steerline.model.fingerprint import model_fingerprint
from steerline.model.load import moe_config
from steerline.steermoe.data.safety import check_prompt_texts
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.capture_dp import CapturePool

PROMPTS = Path("data/prompts/safety.parquet")
ROUTING = Path("data/routing")
GENERATIONS = Path("data/generations.parquet")
CACHE = Path("data/.capture_cache")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model folder (default: capture_routing.model)")
    ap.add_argument("--routing", type=Path, default=ROUTING, help="routing shards folder")
    ap.add_argument("--generations", type=Path, default=GENERATIONS, help="answers Parquet file")
    ap.add_argument("--cache", type=Path, default=CACHE, help="resumable shard cache folder")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params()
    p = params.capture_routing
    model = args.model or p.model
    torch.manual_seed(params.seed)
    prompts = pd.read_parquet(PROMPTS)
    if "split" in prompts.columns:
        prompts = prompts[prompts["split"] == "detect"]  # the test split is never used here
    check_prompt_texts(prompts, str(PROMPTS))
    moe_config(model)  # a missing or dense model is rejected before any weight is loaded
    fingerprint = model_fingerprint(model)
    vllm_options = dict(tensor_parallel_size=p.tensor_parallel_size,
                        gpu_memory_utilization=p.gpu_memory_utilization,
                        max_num_seqs=p.max_num_seqs, seed=params.seed)
    options = vllm_options if p.backend == "vllm" else {}
    # data_parallel_size > 1: that many engine processes, each capturing whole shards (the
    # output is byte-identical to one engine; steerline.steermoe.routing.capture_dp says why not vLLM's)
    dp = int(p.data_parallel_size or 1)
    opened = (CapturePool(dp, p.backend, model, p.dtype, p.batch_size, options, params.seed)
              if dp > 1 else make_backend(p.backend, model, p.dtype, batch_size=p.batch_size,
                                          **options))
    with opened as backend:
        gens = run_capture(
            backend,
            AutoTokenizer.from_pretrained(model),
            prompts,
            CaptureConfig(p.max_new_tokens, p.shard_prompts),
            args.routing,
            args.generations,
            args.cache,
            meta={"model": model, "model_fingerprint": fingerprint,
                  "dtype": p.dtype},
        )
    print(
        f"captured {len(gens)} prompts with {p.backend}"
        f"{f' ({dp} processes)' if dp > 1 else ''}, "
        f"{int(gens['n_generated_tokens'].sum())} generated tokens "
        f"({float(gens['finished'].mean()):.0%} stopped at end-of-turn)"
    )


if __name__ == "__main__":
    run_stage(main)
