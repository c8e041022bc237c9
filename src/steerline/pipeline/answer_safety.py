"""answer_safety's runs: one model's eval_safety variants answer the split's prompts, unjudged.

- answer_safety_base: the MoE (params.yaml `model`) as base and steered (the SteerMoE router plan of
  `expert_steering`), and the base answers to the safe prompts that every variant's perplexity
  scores (the reference file);
- answer_safety_finetuned: finetune_experts' model as finetuned, finetuned_deactivate and
  finetuned_activate (its own unsafe experts forced out of / into the top-k by
  `finetuned_steering`);
- in both, each steered variant whose `gate` is a source gets its gated twin `<variant>_gated`:
  the same plan on the prompts the model's prompt gate (train_gate) fires on.
One stage per model, so a change to one model's steering params regenerates only that model's
answers; eval_safety judges and joins the two folders. Answers come from the `backend` engine
(vLLM by default: all of one model's variants in one call, steered per request), gate scores
and perplexity from the transformers model with the same hooks, loaded once per stage.

Each writes a folder of steermoe.safety.answers.ModelAnswers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.backends import Backend, make_backend
from steerline.backends.hf import TransformersBackend
from steerline.core.io import (
    read_json,
    staged_outputs,
    write_parquet,
    write_timings,
)
from steerline.core.params import Params
from steerline.model.gpu import free_gpu
from steerline.model.load import load_moe
from steerline.steering.experts import SteeringPlan, read_experts_json
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.gating.prompt_gate import load_gate
from steerline.steermoe.gating.scoring import GateScores, score_prompts
from steerline.steermoe.safety.answers import PROMPT_COLUMNS, ModelAnswers
from steerline.steermoe.safety.gated import GatedPlan
from steerline.steermoe.safety.generation import Answer, backend_answers
from steerline.steermoe.safety.perplexity import benign_nll_rows
from steerline.steermoe.safety.prompts import select_eval_prompts
from steerline.steermoe.safety.steering_plan import (
    check_finetuned_selection,
    finetuned_plan,
    selection_plan,
)

Plan = SteeringPlan | GatedPlan | None
Shape = tuple[Any, int, int]  # (MoE layer indices or count, experts, top_k)
log = logging.getLogger("answer_safety")


@dataclass(frozen=True)
class BaseInputs:
    model: str  # the MoE folder (params.yaml `model`), recorded as given in the answers
    prompts: Path  # data/prompts/safety.parquet
    experts: Path  # selected on the base model's routing
    risk_diff: Path  # the raw ranking (on_empty_selection: risk_diff_ranking)
    gate: Path  # train_gate's folder for `model`


@dataclass(frozen=True)
class BaseOutputs:
    answers: Path  # folder (ModelAnswers)
    reference: Path  # base answers to the safe prompts: prompt_id, text, answer


@dataclass(frozen=True)
class FinetunedInputs:
    finetuned: str  # finetune_experts' model folder, recorded as given in the answers
    prompts: Path
    experts_finetuned: Path  # selected on the fine-tuned model's routing
    risk_diff_finetuned: Path  # its raw ranking (expert_steering.on_empty_selection)
    gate_finetuned: Path  # train_gate's folder for `finetuned`
    reference: Path  # answer_safety_base's reference file


@dataclass(frozen=True)
class FinetunedOutputs:
    answers_finetuned: Path  # folder (ModelAnswers)


def eval_prompts(params: Params, path: Path) -> pd.DataFrame:
    """The split's seeded eval prompts (PROMPT_COLUMNS), the same for both models."""
    p = params.eval_safety
    return select_eval_prompts(read_safety_prompts(path), p.max_unsafe, p.max_safe,
                               params.data_seed, split=p.split,
                               source_order=[s.name for s in params.prepare_safety.sources])


def check_selected_on(selection: dict[str, Any], path: Path, model_dir: str) -> None:
    """An experts.json steers only the model it was selected on."""
    picked_on = (selection.get("criteria") or {}).get("model")
    if picked_on and Path(picked_on).resolve() != Path(model_dir).resolve():
        raise ValueError(f"{path} was selected on {picked_on!r}, not on {model_dir!r}: rerun "
                         "its detection stages on that model (dvc repro)")


def gate_sources(params: Params) -> dict[str, str]:
    """Steered variant -> the gate source of its gated twin (variants with gate none: absent)."""
    s, fs = params.expert_steering, params.finetuned_steering
    sources = {"steered": s.gate, "finetuned_deactivate": fs.deactivate.gate,
               "finetuned_activate": fs.activate.gate}
    return {name: src for name, src in sources.items() if src != "none"}


def with_gated(variants: dict[str, Plan], sources: dict[str, str],
               scores: dict[str, GateScores]) -> dict[str, Plan]:
    """The variants with each gated twin after its ungated variant."""
    out: dict[str, Plan] = {}
    for name, plan in variants.items():
        out[name] = plan
        if name in sources and isinstance(plan, SteeringPlan):
            out[f"{name}_gated"] = GatedPlan(plan, scores[sources[name]][1], sources[name])
    return out


def answer_model(params: Params, model_dir: str, prompts: pd.DataFrame,
                 make_variants: Callable[[Shape], dict[str, Plan]], sources: dict[str, str],
                 gate_dir: Path, reference: pd.DataFrame | None, seconds: dict[str, float]
                 ) -> tuple[ModelAnswers, pd.DataFrame]:
    """Every variant of `model_dir` (make_variants: from the backend's shape) answers `prompts`
    in one backend call, each variant in `sources` with its gated twin; then each ungated
    variant scores the reference answers' NLL (reference None: this model's first, unsteered
    variant's answers to the safe prompts). Returns the answers and the reference scored.
    The transformers model (on the GPU when there is one) runs the gates' prefill, the NLL and
    (transformers backend) the answers; with vLLM on a GPU it leaves the GPU to the engine while
    the answers are generated and loads again for the NLL, so one copy of the weights is on the
    GPU at a time."""
    p, g = params.eval_safety, params.prompt_gate
    texts = prompts["text"].tolist()
    # the gate files are checked before the (slow) model load
    gates = {src: load_gate(gate_dir, src) for src in sorted(set(sources.values()))}
    t = time.perf_counter()
    model, tokenizer = load_moe(model_dir, p.dtype)
    seconds["load"] = time.perf_counter() - t
    scores = {}
    if gates:
        t = time.perf_counter()
        scores = score_prompts(gates, model, tokenizer, texts, g.batch_size,
                               desc=f"gate features {model_dir}")
        seconds["gate"] = time.perf_counter() - t

    t = time.perf_counter()
    yields_gpu = gives_way_to_engine(p.backend, model)
    if yields_gpu:
        del model
        free_gpu()
    with answer_backend(params, model_dir, None if yields_gpu else model, tokenizer) as backend:
        variants = with_gated(make_variants((backend.moe_layers or backend.n_layers,
                                             backend.n_experts, backend.top_k)),
                              sources, scores)
        answers = backend_answers(backend, tokenizer, texts, list(variants.values()),
                                  p.max_new_tokens)
    rows = pd.concat([answer_rows(name, prompts, ans)
                      for name, ans in zip(variants, answers, strict=True)], ignore_index=True)
    seconds["generate"] = time.perf_counter() - t
    if yields_gpu:
        free_gpu()
        model, tokenizer = load_moe(model_dir, p.dtype)

    if reference is None:
        reference = safe_answers(rows, next(iter(variants)),
                                 {s.name for s in params.prepare_safety.sources if s.detection})
    t = time.perf_counter()
    nll = []
    for name, vp in variants.items():
        if not isinstance(vp, GatedPlan):
            row_nll, count = benign_nll_rows(model, tokenizer, reference, vp, p.batch_size, name)
            nll.append(pd.DataFrame({"variant": name,
                                     "prompt_id": reference["prompt_id"].to_numpy(),
                                     "nll": row_nll, "n_tokens": count}))
    seconds["perplexity"] = time.perf_counter() - t
    meta = {"model": model_dir, "split": p.split,
            "generation": {"backend": p.backend, "max_new_tokens": p.max_new_tokens,
                           "greedy": True},
            "variants": {name: variant_kind(vp) for name, vp in variants.items()},
            "plans": {name: {"n_activated": len(vp.activate),
                             "n_deactivated": len(vp.deactivate),
                             "layers": len(vp.per_layer()), "plan": vp.to_json()}
                      for name, vp in variants.items() if isinstance(vp, SteeringPlan)}}
    return ModelAnswers(rows, pd.concat(nll, ignore_index=True), gate_frame(prompts, scores),
                        meta), reference


def gives_way_to_engine(backend: str, model: nn.Module) -> bool:
    """True where `model` sits on a GPU that a vLLM engine (its own copy of the weights) is about
    to take: the transformers model is freed for the answers and loaded again after them. On the
    CPU both fit in host memory as they always did, and the transformers backend answers on
    `model` itself."""
    return backend == "vllm" and next(model.parameters()).is_cuda


def answer_backend(params: Params, model_dir: str, model: nn.Module | None,
                   tokenizer: PreTrainedTokenizerBase) -> Backend:
    """eval_safety's backend: the transformers one answers on `model` (where load_moe put it);
    vLLM loads its own engine (tensor_parallel_size GPUs)."""
    p = params.eval_safety
    if p.backend == "transformers":
        assert model is not None  # gives_way_to_engine keeps it for this backend
        return TransformersBackend(model, tokenizer, p.batch_size)
    return make_backend(p.backend, model_dir, p.dtype, batch_size=p.batch_size,
                        seed=params.seed, tensor_parallel_size=p.tensor_parallel_size)


def variant_kind(plan: Plan) -> dict[str, str]:
    if isinstance(plan, GatedPlan):
        return {"kind": "gated", "source": plan.source}
    return {"kind": "unsteered" if plan is None else "steered"}


def answer_rows(name: str, prompts: pd.DataFrame, answers: list[Answer]) -> pd.DataFrame:
    """One variant's unjudged answers, one row per prompt, in the prompts' order."""
    return pd.DataFrame({
        "variant": name, **{c: prompts[c].to_numpy() for c in PROMPT_COLUMNS},
        "answer": [a.text for a in answers],
        "n_generated": np.asarray([a.n_generated for a in answers], dtype=np.int32),
        "finished": np.asarray([a.finished for a in answers], dtype=bool),
    })


def safe_answers(rows: pd.DataFrame, variant: str, sources: set[str]) -> pd.DataFrame:
    """`variant`'s answers to the safe prompts of `sources` (prompt_id, text, answer): the
    reference that every variant's perplexity scores. The detection sources' (XSTest by
    default): an evaluation-only source adds refusal figures, not perplexity rows, whose
    scoring costs as much as answering again."""
    own = rows[rows["variant"] == variant]
    return own[(own["label"] == "safe") & own["source"].isin(sources)][
        ["prompt_id", "text", "answer"]]


def gate_frame(prompts: pd.DataFrame, scores: dict[str, GateScores]) -> pd.DataFrame:
    ids = prompts["prompt_id"].to_numpy()
    frames = [pd.DataFrame({"source": src, "prompt_id": ids, "score": sc,
                            "fires": np.asarray(fires, dtype=bool)})
              for src, (sc, fires) in sorted(scores.items())]
    empty = pd.DataFrame({"source": pd.Series(dtype=object), "prompt_id": ids[:0],
                          "score": np.zeros(0), "fires": np.zeros(0, dtype=bool)})
    return pd.concat(frames, ignore_index=True) if frames else empty


def main_base(params: Params, inputs: BaseInputs, out: BaseOutputs) -> None:
    s = params.expert_steering
    torch.manual_seed(params.seed)
    prompts = eval_prompts(params, inputs.prompts)
    selection = read_experts_json(inputs.experts)
    check_selected_on(selection, inputs.experts, inputs.model)

    def plans(shape: Shape) -> dict[str, Plan]:
        return {"base": None,
                "steered": selection_plan(selection, s.mode, s.n_experts, s.delta,
                                          s.on_empty_selection,
                                          lambda: pd.read_parquet(inputs.risk_diff), *shape)}

    seconds: dict[str, float] = {}
    sources = {v: src for v, src in gate_sources(params).items() if v == "steered"}
    result, reference = answer_model(params, inputs.model, prompts, plans, sources, inputs.gate,
                                     None, seconds)
    result.meta["steering"] = {"expert_steering": {"mode": s.mode, "n_experts": s.n_experts,
                                                   "delta": s.delta, "gate": s.gate}}
    write_timings("answer_safety_base", seconds)
    with staged_outputs() as staged:
        result.write(staged.dir(out.answers))
        write_parquet(reference.reset_index(drop=True), staged(out.reference))
    log.info("%s: %d variants x %d prompts answered", inputs.model,
             len(result.meta["variants"]), len(prompts))


def main_finetuned(params: Params, inputs: FinetunedInputs, out: FinetunedOutputs) -> None:
    fs = params.finetuned_steering
    torch.manual_seed(params.seed)
    prompts = eval_prompts(params, inputs.prompts)
    info_path = Path(inputs.finetuned) / "trained_experts.json"
    if not info_path.is_file():
        raise ValueError(f"{info_path} not found: run the finetune_experts stage first")
    info = read_json(info_path)
    selection = read_experts_json(inputs.experts_finetuned)
    check_selected_on(selection, inputs.experts_finetuned, inputs.finetuned)
    on_empty = params.expert_steering.on_empty_selection
    check_finetuned_selection(selection, on_empty)  # before the (slow) model load
    reference = pd.read_parquet(inputs.reference)
    if not set(reference["prompt_id"]) <= set(prompts["prompt_id"]):
        raise ValueError(f"{inputs.reference} answers other prompts than this split's: rerun "
                         "answer_safety_base with the same eval_safety params")

    def plans(shape: Shape) -> dict[str, Plan]:
        return {"finetuned": None,
                **{f"finetuned_{d}": finetuned_plan(
                    selection, d, c.n_experts, c.delta, on_empty,
                    lambda: pd.read_parquet(inputs.risk_diff_finetuned), *shape)
                   for d, c in (("deactivate", fs.deactivate), ("activate", fs.activate))}}

    seconds: dict[str, float] = {}
    sources = {v: src for v, src in gate_sources(params).items() if v != "steered"}
    result, _ = answer_model(params, inputs.finetuned, prompts, plans, sources,
                             inputs.gate_finetuned, reference, seconds)
    result.meta["steering"] = {"finetuned_steering": fs.model_dump()}
    result.meta["finetuned"] = {"n_experts_trained": info["n_experts"], "source": info["source"],
                                "checks": info.get("checks")}
    write_timings("answer_safety_finetuned", seconds)
    with staged_outputs() as staged:
        result.write(staged.dir(out.answers_finetuned))
    log.info("%s: %d variants x %d prompts answered", inputs.finetuned,
             len(result.meta["variants"]), len(prompts))
