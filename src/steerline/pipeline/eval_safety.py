"""eval_safety's run: five variants answer the same prompts of one split, judged and compared.

- base (`model`), steered (`model` + the SteerMoE router plan of `expert_steering`),
- finetuned (`finetuned`), finetuned_deactivate / finetuned_activate (the fine-tuned model with
  its own unsafe experts, detected on its routing, forced out of / into the top-k by
  `finetuned_steering`),
- for each steered variant whose `gate` is a source, its gated twin `<variant>_gated`: the same
  plan on the prompts that model's prompt gate (train_gate) fires on, the rest unsteered.
Answers come from the `backend` engine (vLLM by default: all variants of one model in one call,
steered per request); perplexity from the transformers model with the same hooks. `run` computes
everything, `write` publishes it. On the test split (read once) or dev (the params sweep):
metrics (rates, Wilson 95% bounds, McNemar p vs the reference), details (every rate with k, n and
its interval, the paired tests, goals, plans, the judge's agreement on its design labels and on
the held-out validation labels), per-prompt answers, a bar plot PNG with the intervals and the
DVC bar-plot data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from steerline.backends import make_backend
from steerline.core.io import read_json, staged_outputs, write_json, write_parquet, write_timings
from steerline.core.params import Params
from steerline.core.stats import rate
from steerline.model.load import load_moe, load_tokenizer
from steerline.steering.experts import SteeringPlan, directional_plan, read_experts_json
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.gating.features import prompt_features
from steerline.steermoe.gating.prompt_gate import load_gate
from steerline.steermoe.safety.evaluate import (
    answer_frame,
    backend_answers,
    bar_plot,
    bar_rows,
    benign_nll_rows,
    compare_variants,
    headline_metrics,
    refusal_metrics,
    results_table,
    select_eval_prompts,
    selection_plan,
    variant_rates,
)
from steerline.steermoe.safety.gated import (
    GatedPlan,
    compose_ppl,
    gate_aurocs,
    gated_goals,
    twin_of,
)
from steerline.steermoe.safety.refusal import judge_agreement, make_judge, read_labels
from steerline.steermoe.safety.tradeoff_plot import tradeoff_plot

Plan = SteeringPlan | GatedPlan | None
Plans = dict[str, dict[str, Plan]]  # model folder -> variant -> plan
log = logging.getLogger("eval_safety")


@dataclass(frozen=True)
class Inputs:
    prompts: Path  # data/prompts/safety.parquet
    experts: Path  # selected on the base model's routing
    experts_finetuned: Path  # selected on the fine-tuned model's routing
    risk_diff: Path  # the raw ranking (on_empty_selection: risk_diff_ranking)
    labels: Path  # the judge's design set
    judge_validation: Path  # labels held out from the judge's design
    gate: Path  # train_gate's folder for `model`
    gate_finetuned: Path  # train_gate's folder for `finetuned`


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    details: Path
    answers: Path
    plot_png: Path
    plot_csv: Path
    tradeoff_png: Path  # refusal vs over-refusal per variant


@dataclass
class SafetyRun:
    frames: dict[str, pd.DataFrame]  # variant -> one judged answer per prompt
    rates: dict[str, dict[str, Any]]
    comparisons: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    details: dict[str, Any]
    plans: Plans
    seconds: dict[str, float]  # wall clock: reports/timings, never a DVC output


def _selections(params: Params, inputs: Inputs) -> dict[Path, dict[str, Any]]:
    """Both experts.json files, each checked to be selected on the model it will steer."""
    p = params.eval_safety
    selections = {path: read_experts_json(path)
                  for path in (inputs.experts, inputs.experts_finetuned)}
    for path, model_dir in ((inputs.experts, p.model), (inputs.experts_finetuned, p.finetuned)):
        picked_on = (selections[path].get("criteria") or {}).get("model")
        if picked_on and Path(picked_on).resolve() != Path(model_dir).resolve():
            raise ValueError(f"{path} was selected on {picked_on!r}, not on {model_dir!r}: rerun "
                             "its detection stages on that model or fix eval_safety's paths")
    return selections


def make_plans(params: Params, inputs: Inputs, selections: dict[Path, dict[str, Any]],
               shape: tuple[Any, int, int]) -> Plans:
    """Every variant's plan; shape = (MoE layer indices, experts, top_k)."""
    p, s, fs = params.eval_safety, params.expert_steering, params.finetuned_steering
    steer = selection_plan(selections[inputs.experts], s.mode, s.n_experts, s.delta,
                           s.on_empty_selection, lambda: pd.read_parquet(inputs.risk_diff),
                           *shape)
    tuned = {f"finetuned_{d}": directional_plan(selections[inputs.experts_finetuned], d,
                                                c.n_experts, c.delta, *shape)
             for d, c in (("deactivate", fs.deactivate), ("activate", fs.activate))}
    return {p.model: {"base": None, "steered": steer},
            p.finetuned: {"finetuned": None, **tuned}}


def gate_sources(params: Params) -> dict[str, str]:
    """Steered variant -> the gate source of its gated twin (variants with gate none: absent)."""
    s, fs = params.expert_steering, params.finetuned_steering
    sources = {"steered": s.gate, "finetuned_deactivate": fs.deactivate.gate,
               "finetuned_activate": fs.activate.gate}
    return {name: src for name, src in sources.items() if src != "none"}


def gate_scores(params: Params, model_dir: str, gate_dir: Path, sources: set[str],
                texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each needed gate source's (score [N], fires [N] bool) per prompt, from one unsteered
    prefill of the model it gates."""
    p, g = params.eval_safety, params.prompt_gate
    gates = {src: load_gate(gate_dir, src) for src in sorted(sources)}
    layers = sorted({gate.layer for gate in gates.values() if gate.layer is not None})
    model, tokenizer = load_moe(model_dir, p.dtype)
    feats = prompt_features(model, tokenizer, texts, layers, g.batch_size,
                            desc=f"gate features {model_dir}")
    del model
    return {src: (gate.scores(feats), gate.fires(feats)) for src, gate in gates.items()}


def add_gated(plans: Plans, sources: dict[str, str],
              scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """Each gated twin after its ungated variant (in place); scores: model folder -> source ->
    (per-prompt gate scores, fires)."""
    for model_dir, variants in plans.items():
        out: dict[str, Plan] = {}
        for name, plan in variants.items():
            out[name] = plan
            if name in sources and isinstance(plan, SteeringPlan):
                src = sources[name]
                out[f"{name}_gated"] = GatedPlan(plan, scores[model_dir][src][1], src)
        plans[model_dir] = out


def run(params: Params, inputs: Inputs) -> SafetyRun:
    p, s, fs = params.eval_safety, params.expert_steering, params.finetuned_steering
    torch.manual_seed(params.seed)
    prompts = select_eval_prompts(read_safety_prompts(inputs.prompts), p.max_unsafe, p.max_safe,
                                  params.seed, split=p.split)
    info_path = Path(p.finetuned) / "trained_experts.json"
    if not info_path.is_file():
        raise ValueError(f"{info_path} not found: run the finetune_experts stage first")
    finetuned_info = read_json(info_path)
    judge = make_judge(p.judge, p.judge_model, p.judge_window, p.dtype)
    judge_figures = {
        "design_set": judge_agreement(judge, read_labels(str(inputs.labels))),
        "validation_set": judge_agreement(judge, read_labels(str(inputs.judge_validation))),
    }
    selections = _selections(params, inputs)
    texts = prompts["text"].tolist()
    sources = gate_sources(params)
    gate_dirs = {p.model: inputs.gate, p.finetuned: inputs.gate_finetuned}
    needed = {p.model: {src for v, src in sources.items() if v == "steered"},
              p.finetuned: {src for v, src in sources.items() if v != "steered"}}
    seconds: dict[str, float] = {}
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for model_dir, srcs in needed.items():
        if srcs:
            t = time.perf_counter()
            scores[model_dir] = gate_scores(params, model_dir, gate_dirs[model_dir], srcs, texts)
            seconds[f"gate {model_dir}"] = time.perf_counter() - t

    # Greedy answers: every variant of one model in one backend call (steered per request).
    frames: dict[str, pd.DataFrame] = {}
    plans: Plans = {}
    options = {"seed": params.seed} if p.backend == "vllm" else {}
    for model_dir in (p.model, p.finetuned):
        t = time.perf_counter()
        tokenizer = load_tokenizer(model_dir)
        with make_backend(p.backend, model_dir, p.dtype, batch_size=p.batch_size,
                          **options) as backend:
            if not plans:
                plans = make_plans(params, inputs, selections,
                                   (backend.moe_layers or backend.n_layers,
                                    backend.n_experts, backend.top_k))
                add_gated(plans, sources, scores)
            variants = plans[model_dir]
            answers = backend_answers(backend, tokenizer, texts, list(variants.values()),
                                      p.max_new_tokens)
        for name, ans in zip(variants, answers, strict=True):
            frames[name] = answer_frame(name, prompts, ans, judge)
        seconds[f"generate {model_dir}"] = time.perf_counter() - t
    # Capability check: perplexity of the base model's answers to the safe prompts, per variant
    # (a gated twin: each row steered where its gate fires, from the two variants' row NLLs).
    reference = frames["base"][frames["base"]["label"] == "safe"]
    position = {pid: i for i, pid in enumerate(prompts["prompt_id"])}
    ref_rows = np.array([position[pid] for pid in reference["prompt_id"]])
    metrics: dict[str, dict[str, float]] = {}
    for model_dir, variants in plans.items():
        t = time.perf_counter()
        model, tokenizer = load_moe(model_dir, p.dtype)
        rows = {name: benign_nll_rows(model, tokenizer, reference, vp, p.batch_size, name)
                for name, vp in variants.items() if not isinstance(vp, GatedPlan)}
        unsteered = next(name for name, vp in variants.items() if vp is None)
        del model
        for name, vp in variants.items():
            if isinstance(vp, GatedPlan):
                ppl = compose_ppl(vp.fires[ref_rows], rows[twin_of(name)], rows[unsteered])
            else:
                ppl = float(np.exp(rows[name][0].sum() / rows[name][1].sum()))
            metrics[name] = {**refusal_metrics(frames[name]), "ppl_benign": ppl,
                             "mean_answer_tokens": float(frames[name]["n_generated"].mean())}
        seconds[f"perplexity {model_dir}"] = time.perf_counter() - t
    plan_info = {name: {"n_activated": len(vp.activate), "n_deactivated": len(vp.deactivate),
                        "layers": len(vp.per_layer()), "plan": vp.to_json()}
                 for variants in plans.values() for name, vp in variants.items()
                 if isinstance(vp, SteeringPlan)}
    unsafe = (prompts["label"] == "unsafe").to_numpy()
    gating = {
        "aurocs": {model_dir: {src: gate_aurocs(sc[src][0], prompts, params.prompt_gate.n_bootstrap,
                                                params.seed) for src in sorted(needed[model_dir])}
                   for model_dir, sc in scores.items()},
        "variants": {name: {"source": vp.source, "ungated_twin": twin_of(name),
                            "fired_unsafe": rate(vp.fires[unsafe]),
                            "fired_safe": rate(vp.fires[~unsafe])}
                     for variants in plans.values() for name, vp in variants.items()
                     if isinstance(vp, GatedPlan)},
    }

    rates = {name: variant_rates(frame) for name, frame in frames.items()}
    comparisons = compare_variants(frames)
    gated_goals(comparisons, metrics)
    details = {
        "split": p.split,
        "n_prompts": {"unsafe": int((prompts["label"] == "unsafe").sum()),
                      "safe": int((prompts["label"] == "safe").sum()),
                      "unsafe_by_source": prompts[prompts["label"] == "unsafe"]
                      .groupby("source").size().astype(int).to_dict()},
        "rates": rates,
        "comparisons": comparisons,
        "steering": {"expert_steering": {"mode": s.mode, "n_experts": s.n_experts,
                                         "delta": s.delta, "gate": s.gate},
                     "finetuned_steering": fs.model_dump(), "plans": plan_info},
        "finetuned": {"n_experts_trained": finetuned_info["n_experts"],
                      "source": finetuned_info["source"],
                      "checks": finetuned_info.get("checks")},
        "judge": judge_figures,
        "gating": gating,
        "generation": {"backend": p.backend, "max_new_tokens": p.max_new_tokens,
                       "greedy": True},
    }
    return SafetyRun(frames, rates, comparisons, metrics, details, plans, seconds)


def write(result: SafetyRun, params: Params, out: Outputs) -> None:
    """Answers, bar plot data and PNG, details and the metrics file, published together
    (core.io.staged_outputs: all or none of them replace the previous run's)."""
    p = params.eval_safety
    write_timings("eval_safety", result.seconds)
    steer = result.plans[p.model]["steered"]
    assert isinstance(steer, SteeringPlan)
    n_trained = result.details["finetuned"]["n_experts_trained"]
    with staged_outputs() as staged:
        write_parquet(pd.concat(list(result.frames.values()), ignore_index=True),
                      staged(out.answers))
        bar_rows(result.rates).to_csv(staged(out.plot_csv), index=False)
        tradeoff_plot(result.rates, staged(out.tradeoff_png),
                      f"{p.model} ({p.split} split): refusal vs over-refusal per variant")
        bar_plot(result.rates, staged(out.plot_png), f"{p.model} ({p.split} split): base, "
                 f"expert-steered ({len(steer.deactivate)} off, {len(steer.activate)} on), "
                 f"fine-tuned ({n_trained} experts) and fine-tuned + steering")
        write_json(result.details, staged(out.details))
        write_json(headline_metrics(result.metrics, result.rates, result.comparisons),
                   staged(out.metrics))


def table(result: SafetyRun) -> str:
    return results_table(result.rates, result.comparisons)


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    result = run(params, inputs)
    write(result, params, out)
    print(table(result))
    val = result.details["judge"]["validation_set"]
    log.info("judge on %d held-out labels: accuracy %.3f, kappa %.3f, %s; %.1f s", val["n"],
             val["accuracy"], val["cohen_kappa"], val["confusion"], time.perf_counter() - t0)
