"""Stage eval_safety: base (models/moe) vs expert-steered (models/moe + the SteerMoE router hook)
vs fine-tuned (models/moe_finetuned) on the test split of the safety prompts ->
reports/safety_eval.json (DVC metrics), reports/safety_eval_details.json, per-prompt answers
(reports/safety_eval_answers.parquet), a bar plot PNG and the DVC bar-plot data."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from steerline.io import atomic_path, read_json, write_json, write_parquet
from steerline.model.arch import find_routers, moe_shape
from steerline.model.load import load_moe
from steerline.params import load_params
from steerline.steermoe.expert_steering import plan_from_experts, read_experts_json
from steerline.steermoe.refusal import judge_agreement, make_judge, read_labels
from steerline.steermoe.safety_eval import (
    bar_plot,
    bar_rows,
    deltas,
    evaluate_variant,
    select_eval_prompts,
)

PROMPTS = Path("data/prompts/safety.parquet")
EXPERTS = Path("models/experts.json")
RISK_DIFF = Path("reports/risk_diff.parquet")
LABELS = Path("tests/data/refusal_labels.jsonl")
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
    p, s = params.eval_safety, params.expert_steering
    torch.manual_seed(params.seed)
    prompts = select_eval_prompts(pd.read_parquet(PROMPTS), p.max_unsafe, p.max_safe,
                                  params.seed)
    info_path = Path(p.finetuned) / "trained_experts.json"
    if not info_path.is_file():
        raise ValueError(f"{info_path} not found: run the finetune_experts stage first")
    finetuned_info = read_json(info_path)
    judge = make_judge(p.judge, p.judge_model, p.judge_window, p.dtype)
    agreement = judge_agreement(judge, read_labels(str(LABELS)))

    model, tokenizer = load_moe(p.model, p.dtype)
    n_layers, (n_experts, top_k) = len(find_routers(model)), moe_shape(model)
    selection = read_experts_json(EXPERTS)
    fallback = pd.read_parquet(RISK_DIFF) if RISK_DIFF.is_file() else None
    plan = plan_from_experts(selection, s.mode, s.n_experts, s.delta, n_layers, n_experts, top_k,
                             fallback)

    metrics: dict[str, dict[str, float]] = {}
    frames = []
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    metrics["base"], base_frame = evaluate_variant(
        "base", model, tokenizer, prompts, judge, p.max_new_tokens, p.batch_size)
    seconds["base"] = time.perf_counter() - t
    reference = base_frame[base_frame["label"] == "safe"]
    frames.append(base_frame)
    t = time.perf_counter()
    metrics["steered"], frame = evaluate_variant(
        "steered", model, tokenizer, prompts, judge, p.max_new_tokens, p.batch_size, plan=plan,
        reference=reference)
    seconds["steered"] = time.perf_counter() - t
    frames.append(frame)
    del model
    tuned, tuned_tok = load_moe(p.finetuned, p.dtype)
    t = time.perf_counter()
    metrics["finetuned"], frame = evaluate_variant(
        "finetuned", tuned, tuned_tok, prompts, judge, p.max_new_tokens, p.batch_size,
        reference=reference)
    seconds["finetuned"] = time.perf_counter() - t
    frames.append(frame)

    metrics = {k: {m: round(v, 4) for m, v in ms.items()} for k, ms in metrics.items()}
    details = {
        "n_prompts": {"unsafe": int((prompts["label"] == "unsafe").sum()),
                      "safe": int((prompts["label"] == "safe").sum()),
                      "unsafe_by_source": prompts[prompts["label"] == "unsafe"]
                      .groupby("source").size().astype(int).to_dict()},
        "deltas_vs_base": deltas(metrics),
        "steering": {"mode": s.mode, "n_experts": s.n_experts, "delta": s.delta,
                     "n_activated": len(plan.activate), "n_deactivated": len(plan.deactivate),
                     "layers": len(plan.per_layer()), "plan": plan.to_json()},
        "finetuned": {"n_experts_trained": finetuned_info["n_experts"],
                      "source": finetuned_info["source"],
                      "checks": finetuned_info.get("checks")},
        "judge": agreement,
        "generation": {"max_new_tokens": p.max_new_tokens, "greedy": True},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    write_parquet(pd.concat(frames, ignore_index=True), ANSWERS)
    with atomic_path(PLOT_CSV) as tmp:
        bar_rows(metrics).to_csv(tmp, index=False)
    bar_plot(metrics, PLOT_PNG, f"{p.model}: base vs expert-steered ({len(plan.deactivate)} off, "
             f"{len(plan.activate)} on) vs fine-tuned ({finetuned_info['n_experts']} experts)")
    write_json(details, DETAILS)
    write_json(metrics, METRICS)
    print(json.dumps(metrics, indent=2))
    print(json.dumps(details["deltas_vs_base"], indent=2))
    log.info("judge agreement on %d hand labels: accuracy %.3f, kappa %.3f; %.1f s", agreement["n"],
             agreement["accuracy"], agreement["cohen_kappa"], time.perf_counter() - t0)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"eval_safety: {err}") from None
