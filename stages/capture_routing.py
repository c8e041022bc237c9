"""Stage capture_routing: models/moe + detect-split safety prompts -> data/routing/ +
data/generations.parquet, through the backend the params name (vLLM by default)."""

from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer

from steerline.backends import make_backend
from steerline.params import load_params
from steerline.steermoe.capture import CaptureConfig, model_fingerprint, run_capture

PROMPTS = Path("data/prompts/safety.parquet")
ROUTING = Path("data/routing")
GENERATIONS = Path("data/generations.parquet")
CACHE = Path("data/.capture_cache")


def main() -> None:
    params = load_params()
    p = params.capture_routing
    torch.manual_seed(params.seed)
    prompts = pd.read_parquet(PROMPTS)
    if "split" in prompts.columns:
        prompts = prompts[prompts["split"] == "detect"]  # the test split is never used here
    vllm_options = dict(tensor_parallel_size=p.tensor_parallel_size,
                        data_parallel_size=p.data_parallel_size,
                        gpu_memory_utilization=p.gpu_memory_utilization,
                        max_num_seqs=p.max_num_seqs, seed=params.seed)
    with make_backend(p.backend, p.model, p.dtype, batch_size=p.batch_size,
                      **(vllm_options if p.backend == "vllm" else {})) as backend:
        gens = run_capture(
            backend,
            AutoTokenizer.from_pretrained(p.model),
            prompts,
            CaptureConfig(p.max_new_tokens, p.shard_prompts),
            ROUTING,
            GENERATIONS,
            CACHE,
            meta={"model": p.model, "model_fingerprint": model_fingerprint(p.model),
                  "dtype": p.dtype},
        )
    print(
        f"captured {len(gens)} prompts with {p.backend}, "
        f"{int(gens['n_generated_tokens'].sum())} generated tokens "
        f"({float(gens['finished'].mean()):.0%} stopped at end-of-turn)"
    )


if __name__ == "__main__":
    main()
