"""Stage eval_safety: on one split of the safety prompts (test by default, read once; dev for the
params sweep), five variants answer the same prompts:
- base (models/moe), steered (models/moe + the SteerMoE router hook of `expert_steering`),
- finetuned (models/moe_finetuned), finetuned_deactivate / finetuned_activate (the fine-tuned
  model with its own unsafe experts, detected on its routing in models/experts_finetuned.json,
  forced out of / into the top-k by `finetuned_steering`).
Answers come from the `eval_safety.backend` engine (vLLM by default: all variants of one model
in one call, steered per request); perplexity from the transformers model with the same hooks.
Writes reports/safety_eval.json (DVC metrics: rates, Wilson 95% bounds, McNemar p vs the
reference), reports/safety_eval_details.json (every rate with k, n and its interval, the paired
tests, goals, plans, the judge's agreement on its design labels and on the held-out validation
labels), per-prompt answers (reports/safety_eval_answers.parquet), a bar plot PNG with the
intervals and the DVC bar-plot data."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import AutoTokenizer

from steerline.backends import make_backend
from steerline.io import atomic_path, read_json, write_json, write_parquet, write_timings
from steerline.model.load import load_moe
from steerline.params import load_params
from steerline.steermoe.expert_steering import SteeringPlan, read_experts_json
from steerline.steermoe.refusal import judge_agreement, make_judge, read_labels
from steerline.steermoe.safety_eval import (
    answer_frame,
    backend_answers,
    bar_plot,
    bar_rows,
    benign_ppl,
    compare_variants,
    directional_plan,
    headline_metrics,
    refusal_metrics,
    results_table,
    select_eval_prompts,
    selection_plan,
    variant_rates,
)

PROMPTS = Path("data/prompts/safety.parquet")
EXPERTS = Path("models/experts.json")
EXPERTS_FINETUNED = Path("models/experts_finetuned.json")  # detected on the fine-tuned routing
RISK_DIFF = Path("reports/risk_diff.parquet")
LABELS = Path("tests/data/refusal_labels.jsonl")  # the judge's design set
JUDGE_VALIDATION = Path("tests/data/refusal_validation.jsonl")  # held out from the judge's design
METRICS = Path("reports/safety_eval.json")
DETAILS = Path("reports/safety_eval_details.json")
ANSWERS = Path("reports/safety_eval_answers.parquet")
PLOT_PNG = Path("reports/safety_eval.png")
PLOT_CSV = Path("reports/safety_eval_bars.csv")

log = logging.getLogger("eval_safety")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    p, s, fs = params.eval_safety, params.expert_steering, params.finetuned_steering
    torch.manual_seed(params.seed)
    prompts = select_eval_prompts(pd.read_parquet(PROMPTS), p.max_unsafe, p.max_safe,
                                  params.seed, split=p.split)
    info_path = Path(p.finetuned) / "trained_experts.json"
    if not info_path.is_file():
        raise ValueError(f"{info_path} not found: run the finetune_experts stage first")
    finetuned_info = read_json(info_path)
    judge = make_judge(p.judge, p.judge_model, p.judge_window, p.dtype)
    judge_figures = {"design_set": judge_agreement(judge, read_labels(str(LABELS))),
                     "validation_set": judge_agreement(judge, read_labels(str(JUDGE_VALIDATION)))}

    selections = {path: read_experts_json(path) for path in (EXPERTS, EXPERTS_FINETUNED)}
    for path, model_dir in ((EXPERTS, p.model), (EXPERTS_FINETUNED, p.finetuned)):
        picked_on = (selections[path].get("criteria") or {}).get("model")
        if picked_on and Path(picked_on).resolve() != Path(model_dir).resolve():
            raise ValueError(f"{path} was selected on {picked_on!r}, not on {model_dir!r}: rerun "
                             "its detection stages on that model or fix eval_safety's paths")

    def make_plans(shape: tuple[Any, int, int]) -> dict[str, dict[str, SteeringPlan | None]]:
        """model folder -> variant -> plan; shape = (MoE layer indices, experts, top_k)."""
        steer = selection_plan(selections[EXPERTS], s.mode, s.n_experts, s.delta,
                               s.on_empty_selection, lambda: pd.read_parquet(RISK_DIFF), *shape)
        tuned = {f"finetuned_{d}": directional_plan(selections[EXPERTS_FINETUNED], d,
                                                    c.n_experts, c.delta, *shape)
                 for d, c in (("deactivate", fs.deactivate), ("activate", fs.activate))}
        return {p.model: {"base": None, "steered": steer},
                p.finetuned: {"finetuned": None, **tuned}}

    # Greedy answers: every variant of one model in one backend call (steered per request).
    frames: dict[str, pd.DataFrame] = {}
    seconds: dict[str, float] = {}
    plans: dict[str, dict[str, SteeringPlan | None]] = {}
    options = {"seed": params.seed} if p.backend == "vllm" else {}
    for model_dir in (p.model, p.finetuned):
        t = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with make_backend(p.backend, model_dir, p.dtype, batch_size=p.batch_size,
                          **options) as backend:
            plans = plans or make_plans((backend.moe_layers or backend.n_layers,
                                         backend.n_experts, backend.top_k))
            variants = plans[model_dir]
            answers = backend_answers(backend, tokenizer, prompts["text"].tolist(),
                                      list(variants.values()), p.max_new_tokens)
        for name, ans in zip(variants, answers, strict=True):
            frames[name] = answer_frame(name, prompts, ans, judge)
        seconds[f"generate {model_dir}"] = time.perf_counter() - t
    # Capability check: perplexity of the base model's answers to the safe prompts, per variant.
    reference = frames["base"][frames["base"]["label"] == "safe"]
    metrics: dict[str, dict[str, float]] = {}
    for model_dir, variants in plans.items():
        t = time.perf_counter()
        model, tokenizer = load_moe(model_dir, p.dtype)
        for name, variant_plan in variants.items():
            metrics[name] = {
                **refusal_metrics(frames[name]),
                "ppl_benign": benign_ppl(model, tokenizer, reference, variant_plan,
                                         p.batch_size, name),
                "mean_answer_tokens": float(frames[name]["n_generated"].mean()),
            }
        del model
        seconds[f"perplexity {model_dir}"] = time.perf_counter() - t
    plan_info = {name: {"n_activated": len(vp.activate), "n_deactivated": len(vp.deactivate),
                        "layers": len(vp.per_layer()), "plan": vp.to_json()}
                 for variants in plans.values() for name, vp in variants.items() if vp}

    rates = {name: variant_rates(frame) for name, frame in frames.items()}
    comparisons = compare_variants(frames)
    details = {
        "split": p.split,
        "n_prompts": {"unsafe": int((prompts["label"] == "unsafe").sum()),
                      "safe": int((prompts["label"] == "safe").sum()),
                      "unsafe_by_source": prompts[prompts["label"] == "unsafe"]
                      .groupby("source").size().astype(int).to_dict()},
        "rates": rates,
        "comparisons": comparisons,
        "steering": {"expert_steering": {"mode": s.mode, "n_experts": s.n_experts,
                                         "delta": s.delta},
                     "finetuned_steering": fs.model_dump(), "plans": plan_info},
        "finetuned": {"n_experts_trained": finetuned_info["n_experts"],
                      "source": finetuned_info["source"],
                      "checks": finetuned_info.get("checks")},
        "judge": judge_figures,
        "generation": {"backend": p.backend, "max_new_tokens": p.max_new_tokens,
                       "greedy": True},
    }
    write_timings("eval_safety", seconds)  # not a DVC output: wall clock differs every run
    write_parquet(pd.concat(list(frames.values()), ignore_index=True), ANSWERS)
    with atomic_path(PLOT_CSV) as tmp:
        bar_rows(rates).to_csv(tmp, index=False)
    steer = plans[p.model]["steered"]
    bar_plot(rates, PLOT_PNG, f"{p.model} ({p.split} split): base, expert-steered "
             f"({len(steer.deactivate)} off, {len(steer.activate)} on), fine-tuned "
             f"({finetuned_info['n_experts']} experts) and fine-tuned + steering")
    write_json(details, DETAILS)
    write_json(headline_metrics(metrics, rates, comparisons), METRICS)
    print(results_table(rates, comparisons))
    val = judge_figures["validation_set"]
    log.info("judge on %d held-out labels: accuracy %.3f, kappa %.3f, %s; %.1f s", val["n"],
             val["accuracy"], val["cohen_kappa"], val["confusion"], time.perf_counter() - t0)


if __name__ == "__main__":
    from steerline.stage_main import run_stage

    run_stage(main)
