"""One model's routing capture, as the capture_routing stage and `steerline detect` run it: the
model's checks, tokenizer and content fingerprint, its backend (or a data-parallel pool of
them), then run_capture with the metadata the routing store records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from steerline import backends
from steerline.model.fingerprint import FINGERPRINT_CACHE, model_fingerprint
from steerline.model.load import check_weights, load_tokenizer, moe_config
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.capture_dp import CapturePool


def capture_model(model: str, prompts: pd.DataFrame, cfg: CaptureConfig, routing_dir: Path,
                  generations_path: Path, cache_dir: Path, *, backend: str, dtype: str,
                  batch_size: int, seed: int, options: dict[str, Any], processes: int = 1,
                  fingerprint_cache: Path | None = FINGERPRINT_CACHE) -> pd.DataFrame:
    """Capture `prompts` (prompt_id, text, label) on the local MoE directory `model` into
    run_capture's three paths; returns the generations table. `options`: the backend's own
    keywords (vLLM's engine settings). `processes` > 1: that many engine processes, each
    capturing whole shards, byte-identical to one engine (capture_dp says why not vLLM's own
    data parallelism). `fingerprint_cache`: model_fingerprint's digest cache (None: none)."""
    torch.manual_seed(seed)  # greedy decoding: the seed of any sampling
    moe_config(model)  # a missing or dense model is rejected before any weight is loaded
    check_weights(model)  # a truncated or missing weights file: one line, before any work
    tokenizer = load_tokenizer(model)
    fingerprint = model_fingerprint(model, fingerprint_cache)
    # backends.make_backend is looked up when called, so a replaced one (tests) is the one run
    opened = (CapturePool(processes, backend, model, dtype, batch_size, options, seed)
              if processes > 1 else backends.make_backend(backend, model, dtype,
                                                          batch_size=batch_size, **options))
    with opened as engine:
        return run_capture(engine, tokenizer, prompts, cfg, routing_dir, generations_path,
                           cache_dir, meta={"model": model, "model_fingerprint": fingerprint,
                                            "dtype": dtype})
