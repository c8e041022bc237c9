"""Typed schema of params.yaml: params.yaml holds every value, this schema only validates them.

Every key is required (a missing key or section is an error, never a silent default), types are
strict (`true` is not an int, `"0.1"` is not a float), numbers are finite and bounded. Unknown
keys are rejected with a message naming the key; invalid YAML is reported with file and line.
An error quotes at most an excerpt of the value, and YAML aliases that expand past
MAX_YAML_NODES nodes are refused before validation. The data files a stage reads (prompt
sources, attribute files) lie inside the repository root or a folder of STEERLINE_DATA_ROOTS.
Each stage reads only its own section (plus `seed`), and lists exactly those keys in dvc.yaml.
MAT-Steer's loss weights are top-level keys so `dvc exp run -S lambda_sparse=0.5` works, and so
are the two model folders: `model` (the MoE every SteerMoE stage steers) and `dense_model`
(MAT-Steer's), which dvc.yaml passes to the stages on their command lines
(`dvc exp run -S model=/path/to/checkpoint` is the whole change).
The `steerline` command reads params.yaml through this schema too; outside the project it takes
the values marked CliDefault on their keys (cli_defaults), the committed params.yaml's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

# Characters of a value an error message quotes: a 2 MB value would otherwise be a 2 MB line
EXCERPT_CHARS = 200


def excerpt(text: str) -> str:
    """`text` cut to EXCERPT_CHARS characters plus its length when longer."""
    if len(text) <= EXCERPT_CHARS:
        return text
    return f"{text[:EXCERPT_CHARS]}... ({len(text)} chars)"


# Folders outside the repository whose data files params may name (os.pathsep-separated)
DATA_ROOTS_ENV = "STEERLINE_DATA_ROOTS"


def _data_roots() -> list[str]:
    """The repository root (stages run from it) and the folders of STEERLINE_DATA_ROOTS, each
    as written and with symlinks resolved."""
    roots = [os.getcwd(), *(r for r in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if r)]
    return [form for r in roots for form in (os.path.abspath(r), os.path.realpath(r))]


def _inside_data_roots(path: str) -> str:
    # `..` is collapsed but symlinks are not followed: a DVC cache linked from outside the
    # repository still counts as inside it
    where = Path(os.path.abspath(path))
    if not any(where.is_relative_to(root) for root in _data_roots()):
        raise ValueError(f"the file is outside the repository root {os.getcwd()}: give a path "
                         f"inside it, or add the file's folder to {DATA_ROOTS_ENV}")
    return path


# A data file a stage reads: relative to the repository root, never outside it (nor an
# absolute path elsewhere) unless under a folder of STEERLINE_DATA_ROOTS
DataPath = Annotated[str, AfterValidator(_inside_data_roots)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


@dataclass(frozen=True)
class CliDefault:
    """A key's value for the `steerline` command outside the project (no ./params.yaml): the
    committed params.yaml's (tests/test_params.py checks they agree). Metadata only: the key
    stays required, the stages take every value from params.yaml."""

    value: Any


Dtype = Literal["float32", "bfloat16", "float16"]
Backend = Literal["vllm", "transformers"]  # vllm: the production engine; transformers: reference
# an empty experts.json list: error, or steer (train) the top of the raw risk_diff ranking
OnEmptySelection = Literal["error", "risk_diff_ranking"]


class BuildModels(Strict):
    gguf_package: str
    gguf_file: str
    n_experts: int = Field(ge=2)
    top_k: int = Field(ge=1)
    shared_fraction: float = Field(ge=0.0, lt=1.0)  # FFN share of the always-on expert
    router_tau: float = Field(gt=0)  # std of router logits: small keeps top-k weights ~1/k
    calib_prompts: int = Field(ge=8)
    eval_prompts: int = Field(ge=4)
    calib_new_tokens: int = Field(ge=1)
    calib_tokens: int = Field(ge=100)  # tokens sampled for clustering and least squares
    ridge_alpha: float = Field(gt=0)
    refit_lambda: float = Field(ge=0)  # 0 = keep dense down projections (no refit)
    batch_size: int = Field(ge=1)


class SafetySourceParams(Strict):
    """One prompt file of prepare_safety (steermoe.data.safety_sources.SafetySource says what
    each key means; the checks that need the file run there). null: the key is not used
    (format: from the path's extension)."""

    name: str  # each row's source; the style / matched contrasts read advbench and xstest
    path: DataPath  # a dep of the stage (dvc.yaml, by index)
    prompt_id: str  # template: {index} (0-based file position) or {COLUMN}, e.g. "x-{index:04d}"
    text: str | None  # the prompt column (null for txt: one prompt per line)
    # paired_chat: the SteerMoE original's messages_0 / messages_1 rows (.jsonl / .parquet)
    format: Literal["csv", "jsonl", "parquet", "txt", "paired_chat"] | None
    label: Literal["unsafe", "safe"] | None  # every row's label (paired_chat: messages_0's), or:
    label_column: str | None  # the column holding unsafe / safe per row
    pair: str | None  # look-alike pairs: rows with equal values (one unsafe, one safe)
    pair_rule: Literal["xstest"] | None  # XSTest v2's contrast_T / T layout instead
    group: str | None  # rows with equal values stay in one split
    stratum: str | None  # each value split on its own (null: the source is one stratum)
    max_prompts: int | None = Field(ge=1)  # seeded subsample (single prompts); null = all
    # every row in this split (test: an evaluation-only source); null = by the split fractions
    split: Literal["detect", "dev", "test"] | None
    # false: the detect rows train the prompt gates only, never expert detection or finetuning
    detection: bool


class PrepareSafety(Strict):
    # detect (routing, detection, finetuning data) / dev (params choices) / test (read once);
    # look-alike pairs and groups stay in one split. detect + dev < 1, the rest is test.
    detect_fraction: float = Field(gt=0.0, lt=1.0)
    dev_fraction: float = Field(gt=0.0, lt=1.0)
    sources: list[SafetySourceParams] = Field(min_length=1)

    @model_validator(mode="after")
    def _test_split_left(self) -> PrepareSafety:
        if self.detect_fraction + self.dev_fraction >= 1:
            raise ValueError(f"detect_fraction + dev_fraction must be < 1 (the rest is the test "
                             f"split), got {self.detect_fraction} + {self.dev_fraction}")
        return self


class CaptureRouting(Strict):
    backend: Backend  # vllm: hooks on its routers
    max_new_tokens: Annotated[int, CliDefault(32)] = Field(ge=0)
    batch_size: Annotated[int, CliDefault(16)] = Field(ge=1)  # transformers backend only
    # prompts per resumable shard (vLLM: all in flight)
    shard_prompts: Annotated[int, CliDefault(64)] = Field(ge=1)
    dtype: Annotated[Dtype, CliDefault("float32")]
    # vLLM scale-out, passed through (null: vLLM's default; on CPU the KV cache is 1 GiB)
    tensor_parallel_size: int = Field(ge=1)
    data_parallel_size: int = Field(ge=1)
    gpu_memory_utilization: float | None = Field(gt=0.0, le=1.0)
    max_num_seqs: int | None = Field(ge=1)


class RiskDiff(Strict):
    # target: the target spans of paired_chat prompts (teacher-forced, docs/own_behaviour.md)
    token_scope: Annotated[Literal["user", "generated", "all", "target"], CliDefault("user")]
    # Prompt-label shuffles, one matmul per chunk: per-pair p-values (smallest 1/(n+1)) and the
    # max-|risk_diff| null. select_experts needs the p-values, so at least 1.
    n_permutations: Annotated[int, CliDefault(1000)] = Field(ge=1, le=1_000_000)
    # |risk_diff| above it "beats the null"
    null_quantile: Annotated[float, CliDefault(0.99)] = Field(gt=0.0, lt=1.0)
    # Prompt resamples for the CI of risk_diff; memory holds [n_bootstrap, layers * experts].
    n_bootstrap: Annotated[int, CliDefault(1000)] = Field(ge=1, le=100_000)
    ci_level: Annotated[float, CliDefault(0.95)] = Field(gt=0.0, lt=1.0)
    # p_perm: fixed (n_permutations shuffles per pair) or sequential (a pair with fewer than
    # p_stop_exceedances exceedances among them draws on, up to p_max_permutations; smallest p
    # 1/(p_max_permutations+1); docs/risk_diff_pvalues.md). Same null_max either way.
    p_method: Annotated[Literal["fixed", "sequential"], CliDefault("sequential")]
    p_max_permutations: Annotated[int, CliDefault(20_000)] = Field(ge=1, le=10_000_000)
    # h: a refined p stops at h / L; relative error ~ 1/sqrt(h), cost ~ h / p shuffles a pair
    p_stop_exceedances: Annotated[int, CliDefault(10)] = Field(ge=1, le=10_000)

    @model_validator(mode="after")
    def _enough_permutations(self) -> RiskDiff:
        # a quantile q is only resolved by >= 1/(1-q) permutations (else it is just the max)
        n, q = self.n_permutations, self.null_quantile
        if n > 0 and n * (1.0 - q) < 1.0 - 1e-9:
            raise ValueError(
                f"null_quantile={q} needs n_permutations >= {round(1.0 / (1.0 - q))}, got {n}"
            )
        # the sequential draws continue the first n_permutations shuffles
        if self.p_method == "sequential" and self.p_max_permutations < n:
            raise ValueError(
                f"p_max_permutations={self.p_max_permutations} is below n_permutations={n}: "
                "the sequential p-values draw beyond the fixed shuffles"
            )
        return self


class SelectExperts(Strict):
    # on risk_diff, which lies in [-1, 1]
    threshold: Annotated[float, CliDefault(0.05)] = Field(ge=0.0, lt=1.0)
    top_k: Annotated[int, CliDefault(50)] = Field(ge=1)
    # on the prompt-level q-value (q_perm)
    alpha: Annotated[float, CliDefault(0.05)] = Field(gt=0.0, le=1.0)
    require: Literal["pooled", "matched", "both"]  # contrasts that must pass (contrasts.py)


# ---- MAT-Steer -------------------------------------------------------------------
Split = Literal["train", "dev", "test"]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
BuiltinAttribute = Literal["truthfulqa", "toxigen", "bbq"]  # params.yaml's default order
BUILTIN_ATTRIBUTES: tuple[str, ...] = get_args(BuiltinAttribute)
# train_steering's curves are dev/<attribute>/... beside dev/loss/...: no attribute takes "loss"
RESERVED_ATTRIBUTE = "loss"


class UserAttributeParams(Strict):
    """A researcher's own MAT-Steer attribute: one file of (prompt, positive, negative, group)
    rows (mat_steer.user_attribute.build_user_attribute; docs/own_behaviour.md)."""

    # the attribute's table, activations and metric (<name>_acc) are named by it
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    path: DataPath  # csv / jsonl / parquet, inside a stage dep
    test_fraction: Fraction  # held out by group first; the rest split by dev_fraction


def _attribute_kind(entry: object) -> str:
    return "built-in" if isinstance(entry, str) else "file"


# a name is a built-in, a mapping a user file: one error of the matching kind, not both kinds'
Attribute = Annotated[Annotated[BuiltinAttribute, Tag("built-in")]
                      | Annotated[UserAttributeParams, Tag("file")],
                      Discriminator(_attribute_kind)]


def attribute_name(entry: Attribute) -> str:
    return entry if isinstance(entry, str) else entry.name


class PrepareAttributes(Strict):
    truthfulqa_fractions: dict[Split, Fraction]
    # ToxiGen / BBQ have no offline splits: a held-out test of a validation split's relative size
    # (toxigen-data "annotated": 940 / 9,900), the rest split 80/20 train/dev; grouped throughout.
    test_fraction: dict[Literal["toxigen", "bbq"], Fraction]
    dev_fraction: float = Field(gt=0.0, lt=1.0)
    truthfulqa_answers_per_label: int = Field(ge=1)  # true / false answer texts per question
    # Evaluation items (questions / BBQ items / statements) kept per task and split (null = all);
    # sized so the stages fit a 2-core CPU. Raise (or null) them on a GPU.
    max_items: dict[Split, Annotated[int, Field(ge=1)] | None]


class ExtractActivations(Strict):
    layer: int | None = Field(ge=0)  # 0-based decoder layer; null = round(layer_ratio * n_layers)
    layer_ratio: float = Field(ge=0.0, lt=1.0)  # MAT-Steer's layer 14 of 32
    pooling: Literal["last", "mean"]
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=2)
    dtype: Dtype


class TrainSteering(Strict):
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=2)
    epochs: int = Field(ge=1)
    sigma: float = Field(gt=0)
    # "median_distance": train on activations / s (s = median distance between training
    # activations), so lr, sigma and init_scale mean the same on any model; "none": raw
    # activations as in MAT-Steer's reference code (sigma 2.0 then saturates the RBF kernel on
    # the default model).
    scale: Literal["median_distance", "none"]
    patience: int = Field(ge=0)  # early stopping on the dev objective; 0 = run all epochs
    init_scale: float = Field(gt=0)
    # "seed": the published objective (L1 sparsity on every gate of a negative, one RBF bandwidth
    # `sigma`, random gates); "targeted": sparsity only on the gates of attributes an example does
    # not violate, MMD with the summed `bandwidths`, gates initialised from L2 logistic probes and
    # trained with the gate detection term (weight lambda_gate). See mat_steer/losses.py.
    objective: Literal["seed", "targeted"]
    bandwidths: list[Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)
    probe_cs: list[Annotated[float, Field(gt=0, le=1e6)]] = Field(min_length=1)  # dev-chosen C
    # targeted: the probe gates start rescaled so their dev medians are gate_target on negatives
    # and 1 - gate_target on positives (sharper, same AUROC); the detection term keeps that
    gate_target: float = Field(gt=0.5, lt=1.0)


class EvalSteering(Strict):
    mean_diff_scales: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)  # chosen on dev
    # MAT-Steer steering-vector multipliers, chosen on dev like the baselines' (one = no sweep)
    mat_scales: list[Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)
    # dev picks at a grid's edge add the next point beyond it (x2 / half), up to this many per
    # side (0 = the grids as given)
    grid_extend: int = Field(ge=0, le=8)
    # Test items scored per attribute (null, or an attribute without a key: the whole test
    # split), sized for a 2-core CPU; a key is a built-in or an attribute of `attributes`
    max_test_items: dict[str, Annotated[int, Field(ge=1)] | None]
    n_bootstrap: int = Field(ge=100, le=100_000)  # paired bootstrap resamples of the items
    max_dev_items: int | None = Field(ge=1)  # per task, for the mean-difference scale sweep
    max_rows: int = Field(ge=1)  # answer choices scored per forward
    dtype: Dtype


# ---- SteerMoE actions: expert steering, selective finetuning, safety evaluation --------------
# The variant itself is always SteerMoE's published rule (every prompt steered); routing /
# residual also evaluates its gated twin `<variant>_gated`, steering only the prompts the
# train_gate gate of that source fires on (steermoe/gating); none: no twin.
GateSource = Literal["routing", "residual"]
Gate = Literal["none", GateSource]


class PromptGateParams(Strict):
    sources: list[GateSource] = Field(min_length=1)
    # residual: the probe layers as fractions of the model's depth (prompt_features.probe_layers:
    # hidden_states index round(depth x n_layers), 0 = embeddings, 1 = the last layer's output),
    # so one list fits 24 or 48 layers; the best by dev AUROC is kept
    depths: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(min_length=1)
    cs: list[Annotated[float, Field(gt=0, le=1e6)]] = Field(min_length=1)  # L2 inverse strengths
    n_bootstrap: int = Field(ge=100, le=100_000)  # prompt resamples of the AUROC intervals
    batch_size: int = Field(ge=1)
    dtype: Dtype
    # all: every source's detect rows (benign instructions beside AdvBench's); detection: only
    # the sources expert detection reads (the earlier gate, which learned their style)
    train_sources: Literal["all", "detection"]
    # fpr_budget: fire on <= max_dev_fpr of each safe source's dev prompts; youden: max TPR - FPR
    threshold: Literal["fpr_budget", "youden"]
    max_dev_fpr: float = Field(gt=0.0, lt=1.0)


class ExpertSteering(Strict):
    # deactivate_unsafe: force experts.json's unsafe experts out of the top-k; activate_safe:
    # force its safe experts in; both. The SteerMoE margin delta on the router log-softmax.
    mode: Literal["deactivate_unsafe", "activate_safe", "both"]
    # Experts per list, in rank order (per-layer caps: <= top_k activated, <= E - top_k
    # deactivated).
    n_experts: int = Field(ge=1)
    delta: float = Field(gt=0, le=100)  # margin on log-probabilities; above ~10 changes nothing
    on_empty_selection: Annotated[OnEmptySelection, CliDefault("error")]
    gate: Gate


class SteerDirection(Strict):
    n_experts: int = Field(ge=1)  # first n of the list, rank order, per-layer caps applied
    delta: float = Field(gt=0, le=100)
    gate: Gate


class FinetunedSteering(Strict):
    # The fine-tuned model steered by its own unsafe experts (models/experts_finetuned.json,
    # detected on its routing): forced out of the top-k (deactivate) or into it (activate).
    deactivate: SteerDirection
    activate: SteerDirection


class FinetuneExperts(Strict):
    max_experts: int | None = Field(ge=1)  # first n unsafe experts of experts.json; null=all
    on_empty_selection: OnEmptySelection  # risk_diff_ranking: train the top fallback_top_n
    fallback_top_n: int = Field(ge=1)
    # The SteerMoE code's HF Trainer settings (lr 5e-5, 3 epochs, batch 4, 100 warmup steps)
    # scaled to a CPU run of ~60 steps: a larger lr, 2 epochs, warmup as a ratio of the steps.
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(ge=0.0)  # 0 = no clipping
    # SFT examples from the detect split (null = all): unsafe -> refusal, safe -> own answer
    max_unsafe: int | None = Field(ge=1)
    max_safe: int | None = Field(ge=1)
    max_length: int = Field(ge=8)
    checkpoint_every: int = Field(ge=0)  # steps between resumable checkpoints (0 = epochs)
    # single: this process; ddp / fsdp: num_processes torchrun workers (gloo on CPU, nccl on
    # CUDA), each on batch_size / num_processes examples of the same global batch
    strategy: Literal["single", "ddp", "fsdp"]
    num_processes: int = Field(ge=1)
    # the weights' dtype in every process (bfloat16: half of float32's memory, the fine-tuned
    # model saved in it); the trained slices keep float32 master copies for AdamW either way
    dtype: Dtype

    @model_validator(mode="after")
    def _world_fits(self) -> FinetuneExperts:
        if self.strategy == "single" and self.num_processes != 1:
            raise ValueError(f"num_processes is {self.num_processes} but strategy is single: "
                             "set strategy ddp (or fsdp), or num_processes 1")
        if self.batch_size % self.num_processes:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_processes "
                             f"{self.num_processes}: each process takes an equal share of "
                             "every global batch")
        return self


class SafetyGoal(Strict):
    # An ungated variant's goal vs its reference (steermoe/safety/goals.py): refusal_unsafe moves
    # at least min_refusal_change points in `direction` (McNemar p < 0.05) and over_refusal_safe
    # rises at most max_over_refusal_rise points.
    direction: Literal[1, -1]
    min_refusal_change: float = Field(ge=0, le=100)
    max_over_refusal_rise: float = Field(ge=0, le=100)


class EvalSafety(Strict):
    split: Literal["dev", "test"]  # dev: choosing params (docs/choices.md); test: read once
    # generation engine (every variant of a model in one call); perplexity uses transformers
    backend: Backend
    # Split prompts evaluated (null = all), seeded subsamples: unsafe in all (sources in
    # proportion) and safe per source (each safe source at most max_safe)
    max_unsafe: int | None = Field(ge=1)
    max_safe: int | None = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    judge: Literal["phrase", "llm"]
    judge_model: str | None  # a local chat model for judge: llm (e.g. on a GPU)
    judge_window: int = Field(ge=1)  # characters of the answer the phrase judge reads
    dtype: Dtype
    # GPUs one vLLM answer engine spans (Mixtral-8x7B's 93 GB of bf16 weights: 2 H100s); a
    # placement knob like capture_routing's, so not a DVC param of the answer stages
    tensor_parallel_size: int = Field(ge=1)
    # per variant (a gated twin takes its ungated twin's); a variant left out has no goal
    goals: dict[Literal["steered", "finetuned", "finetuned_deactivate", "finetuned_activate"],
                SafetyGoal]


class Params(Strict):
    seed: Annotated[int, CliDefault(0)] = Field(ge=0)  # what the methods draw (params.yaml)
    data_seed: int = Field(ge=0)  # which items each split and evaluation subset holds
    # Local model folders (a hub checkpoint downloaded beforehand), free paths: the MoE of every
    # SteerMoE stage and the `steerline` commands' --model default, and MAT-Steer's dense model
    model: Annotated[str, CliDefault("models/moe")] = Field(min_length=1)
    dense_model: str = Field(min_length=1)
    build_models: BuildModels
    prepare_safety: PrepareSafety
    capture_routing: CaptureRouting
    risk_diff: RiskDiff
    select_experts: SelectExperts
    # MAT-Steer loss weights: top-level so `dvc exp run -S lambda_sparse=0.5` works.
    lambda_mmd: float = Field(ge=0)
    lambda_sparse: float = Field(ge=0)
    lambda_ortho: float = Field(ge=0)
    lambda_pos: float = Field(ge=0)
    lambda_gate: float = Field(ge=0)  # objective "targeted": the gate detection term
    # MAT-Steer's attributes, in steering-vector order: built-in names or user files; top-level
    # (read by every MAT-Steer stage, like seed) so `dvc exp run -S attributes=[...]` works
    attributes: list[Attribute] = Field(min_length=1)
    prepare_attributes: PrepareAttributes
    extract_activations: ExtractActivations
    train_steering: TrainSteering
    eval_steering: EvalSteering
    prompt_gate: PromptGateParams
    expert_steering: ExpertSteering
    finetuned_steering: FinetunedSteering
    finetune_experts: FinetuneExperts
    eval_safety: EvalSafety

    @model_validator(mode="after")
    def _attributes_named_once(self) -> Params:
        names = [attribute_name(a) for a in self.attributes]
        for a in self.attributes:
            if not isinstance(a, str) and a.name in BUILTIN_ATTRIBUTES:
                raise ValueError(f"attributes: the user attribute {a.name!r} takes a built-in's "
                                 f"name: give it another name, or list the built-in as {a.name}")
            if not isinstance(a, str) and a.name == RESERVED_ATTRIBUTE:
                raise ValueError(f"attributes: {a.name!r} names train_steering's dev losses "
                                 "(dev/loss/...): give the attribute another name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"attributes: {repeated[0]!r} is listed twice: list each once")
        unknown = sorted(set(self.eval_steering.max_test_items) - set(names)
                         - set(BUILTIN_ATTRIBUTES))
        if unknown:
            raise ValueError(f"eval_steering.max_test_items.{excerpt(unknown[0])} is neither a "
                             "built-in nor an attribute of `attributes` "
                             f"{excerpt(str(names))}: fix its spelling")
        return self

    @property
    def attribute_names(self) -> list[str]:
        """The attributes' names in params order (the steering vectors' order)."""
        return [attribute_name(a) for a in self.attributes]


def cli_defaults(model: type[BaseModel] = Params) -> dict[str, Any]:
    """The CliDefault values of `model`, nested as in params.yaml: {"seed": 0, "risk_diff":
    {...}, ...}; keys and sections without one are absent."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        marks = [m.value for m in field.metadata if isinstance(m, CliDefault)]
        section = field.annotation
        if marks:
            out[name] = marks[0]
        elif isinstance(section, type) and issubclass(section, BaseModel):
            inner = cli_defaults(section)
            if inner:
                out[name] = inner
    return out


class ParamsError(ValueError):
    """params.yaml does not match the schema."""


# Nodes a YAML document may expand to through its aliases (params.yaml has a few hundred): a
# 1.2 KB "billion laughs" of nested aliases expands to ~10^9, whose repr in an error message
# alone takes gigabytes
MAX_YAML_NODES = 100_000


class YamlSizeError(ValueError):
    """A YAML document expands past MAX_YAML_NODES nodes through its aliases."""


def _expanded_nodes(node: yaml.Node, counted: dict[int, int]) -> int:
    """The nodes of `node` with every alias written out, counted without writing them out:
    an anchored node is counted once and its aliases reuse the count (-1 while it is being
    counted: an alias inside its own anchor, which expands without end)."""
    known = counted.get(id(node))
    if known is not None:
        return known if known >= 0 else MAX_YAML_NODES + 1
    counted[id(node)] = -1
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1 + sum(_expanded_nodes(c, counted) for c in children)
    counted[id(node)] = total
    return total


def load_yaml(path: Path) -> Any:
    """yaml.safe_load of the file `path`, refusing (YamlSizeError) a document whose aliases
    expand past MAX_YAML_NODES nodes before any Python object is built."""
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node, {})
        if n > MAX_YAML_NODES:
            raise YamlSizeError(f"{path}: its YAML aliases expand to over {MAX_YAML_NODES:,} "
                                "values: write the values out instead of nesting aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _source_name(raw: object, loc: tuple) -> str:
    """' (source NAME)' for an error inside prepare_safety.sources[i] that has a name: the
    index alone does not say which file to fix."""
    if loc[:2] != ("prepare_safety", "sources") or len(loc) < 3 or not isinstance(loc[2], int):
        return ""
    try:
        name = raw["prepare_safety"]["sources"][loc[2]]["name"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""
    return f" (source {excerpt(repr(name))})" if isinstance(name, str) else ""


# Errors one message lists (a params.yaml missing whole sections has ~30): a list of 100,000
# bad items would otherwise make a line of 100,000 errors
MAX_ERRORS = 50


def _format(err: ValidationError, raw: object = None) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS]:
        key = excerpt(repr(".".join(str(p) for p in e["loc"])))  # a key may be user text
        of = _source_name(raw, tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown params key {key}{of}: remove it or fix its spelling")
        elif not e["loc"]:  # a check across sections: its message names the keys
            lines.append(msg)
        elif e["type"] == "missing":
            lines.append(f"params key {key}{of} is missing: every key is required, add it to "
                         "params.yaml (README, 'Params and your own model')")
        else:
            lines.append(f"params key {key}{of}: {msg} (got {excerpt(repr(e.get('input')))})")
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS} more errors")
    return "; ".join(lines)


def parse_params(raw: object) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of keys to values, got {type(raw).__name__}: "
                          "params.yaml is empty or not a YAML mapping")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err, raw)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stage from the repository root")
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{where}: invalid YAML ({problem}): fix the syntax there") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
