"""Stage capture_routing: models/moe + detect-split safety prompts -> data/routing/ +
data/generations.parquet (transformers backend)."""

from pathlib import Path

import pandas as pd
import torch

from steerline.capture import CaptureConfig, load_moe, model_fingerprint, run_capture
from steerline.params import load_params

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
    model, tokenizer = load_moe(p.model, p.dtype)
    gens = run_capture(
        model,
        tokenizer,
        prompts,
        CaptureConfig(p.max_new_tokens, p.batch_size, p.shard_prompts),
        ROUTING,
        GENERATIONS,
        CACHE,
        meta={"model": p.model, "model_fingerprint": model_fingerprint(p.model),
              "backend": p.backend, "dtype": p.dtype},
    )
    print(
        f"captured {len(gens)} prompts, {int(gens['n_generated_tokens'].sum())} generated tokens "
        f"({float(gens['finished'].mean()):.0%} stopped at end-of-turn)"
    )


if __name__ == "__main__":
    main()
