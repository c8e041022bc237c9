"""eval_safety's run: the answers of both models' variants (answer_safety_base and
answer_safety_finetuned) judged, scored and compared.

Variants: base, steered, finetuned, finetuned_deactivate, finetuned_activate and the gated twins
`<variant>_gated` (steering/answer_safety). On the test split (read once) or dev (the params
sweep): metrics (rates, Wilson 95% bounds, McNemar p vs the reference), details (every rate with
k, n and its interval, the paired tests, goals, plans, the gates' AUROCs, the judge's agreement on
its design labels and on the held-out validation labels), per-prompt answers with the verdicts, a
bar plot PNG with the intervals and the DVC bar-plot data. A judge change reruns only this stage:
no model is loaded unless the judge is an LLM.
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

from steerline.core.io import staged_outputs, write_json, write_parquet, write_timings
from steerline.core.params import EvalSafety, Params
from steerline.steermoe.gating.report import gate_figures
from steerline.steermoe.safety.answers import PROMPT_COLUMNS, ModelAnswers
from steerline.steermoe.safety.compare import compare_variants
from steerline.steermoe.safety.gated import compose_ppl, twin_of
from steerline.steermoe.safety.generation import Answer
from steerline.steermoe.safety.goals import Goal, gate_goal, gated_goals
from steerline.steermoe.safety.plots import bar_plot, bar_rows, tradeoff_plot
from steerline.steermoe.safety.refusal import RefusalJudge, judge_agreement, make_judge, read_labels
from steerline.steermoe.safety.summary import headline_metrics, results_table
from steerline.steermoe.safety.verdicts import answer_frame, refusal_metrics, variant_rates

log = logging.getLogger("eval_safety")


@dataclass(frozen=True)
class Inputs:
    answers: Path  # answer_safety_base's folder
    answers_finetuned: Path  # answer_safety_finetuned's folder
    labels: Path  # the judge's design set
    judge_validation: Path  # labels held out from the judge's design


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    details: Path
    answers_judged: Path  # every variant's answers with the judge's verdicts
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
    heading: str  # "<model> (<split> split)", the plots' titles open with it
    title: str  # the bar plot's
    seconds: dict[str, float]  # wall clock: reports/timings, never a DVC output


def eval_prompts(runs: list[ModelAnswers]) -> pd.DataFrame:
    """The prompts both models answered (PROMPT_COLUMNS), checked to be the same."""
    first = [r.answers[r.answers["variant"] == next(iter(r.meta["variants"]))][PROMPT_COLUMNS]
             .reset_index(drop=True) for r in runs]
    if not first[0].equals(first[1]) or runs[0].meta["split"] != runs[1].meta["split"]:
        raise ValueError("the two answer_safety folders answer different prompts: rerun both "
                         "answer_safety stages with the same eval_safety params")
    return first[0]


def judged_frames(run: ModelAnswers, prompts: pd.DataFrame, judge: RefusalJudge
                  ) -> dict[str, pd.DataFrame]:
    """Each variant's answers with the judge's verdicts (ANSWER_COLUMNS), in the prompts' order."""
    out = {}
    for name in run.meta["variants"]:
        rows = run.answers[run.answers["variant"] == name]
        answers = [Answer(a, int(n), bool(f)) for a, n, f in
                   zip(rows["answer"], rows["n_generated"], rows["finished"], strict=True)]
        out[name] = answer_frame(name, prompts, answers, judge)
    return out


def variant_metrics(run: ModelAnswers, frames: dict[str, pd.DataFrame], prompts: pd.DataFrame
                    ) -> dict[str, dict[str, float]]:
    """Refusal metrics, benign perplexity (a gated twin: each reference row steered where its
    gate fires, from the two variants' row NLLs) and answer length per variant."""
    variants = run.meta["variants"]
    rows = {name: (g["nll"].to_numpy(), g["n_tokens"].to_numpy())
            for name, g in run.nll.groupby("variant", sort=False)}
    unsteered = next(name for name, v in variants.items() if v["kind"] == "unsteered")
    position = {pid: i for i, pid in enumerate(prompts["prompt_id"])}
    ref_rows = np.array([position[pid] for pid in
                         run.nll[run.nll["variant"] == unsteered]["prompt_id"]])
    out = {}
    for name, v in variants.items():
        if v["kind"] == "gated":
            ppl = compose_ppl(fires(run, v["source"])[ref_rows], rows[twin_of(name)],
                              rows[unsteered])
        else:
            ppl = float(np.exp(rows[name][0].sum() / rows[name][1].sum()))
        out[name] = {**refusal_metrics(frames[name]), "ppl_benign": ppl,
                     "mean_answer_tokens": float(frames[name]["n_generated"].mean())}
    return out


def fires(run: ModelAnswers, source: str) -> np.ndarray:
    return run.gates[run.gates["source"] == source]["fires"].to_numpy()  # [N prompts] bool


def gating(runs: list[ModelAnswers], prompts: pd.DataFrame, n_bootstrap: int, seed: int
           ) -> dict[str, Any]:
    """Each gate's figures on the eval prompts (per model, per gate source: AUROC per contrast
    and firing rate per prompt source, gating.report) and which gate each gated twin reads."""
    labels, sources = prompts["label"].to_numpy(), prompts["source"].to_numpy()
    gates = {run.meta["model"]: {
        src: gate_figures(g["score"].to_numpy(), g["fires"].to_numpy(bool), labels, sources,
                          n_bootstrap, seed)
        for src, g in run.gates.groupby("source", sort=True)} for run in runs if len(run.gates)}
    variants = {name: {"source": v["source"], "ungated_twin": twin_of(name),
                       "model": run.meta["model"]}
                for run in runs for name, v in run.meta["variants"].items()
                if v["kind"] == "gated"}
    return {"gates": gates, "variants": variants}


def goals_of(p: EvalSafety) -> dict[str, Goal]:
    """Each variant's goal from params (eval_safety.goals)."""
    return {name: Goal(g.direction, g.min_refusal_change, g.max_over_refusal_rise)
            for name, g in p.goals.items()}


def run(params: Params, inputs: Inputs) -> SafetyRun:
    p = params.eval_safety
    torch.manual_seed(params.seed)
    runs = [ModelAnswers.read(inputs.answers), ModelAnswers.read(inputs.answers_finetuned)]
    base, tuned = runs
    prompts = eval_prompts(runs)
    t = time.perf_counter()
    judge = make_judge(p.judge, p.judge_model, p.judge_window, p.dtype)
    judge_figures = {
        "design_set": judge_agreement(judge, read_labels(str(inputs.labels))),
        "validation_set": judge_agreement(judge, read_labels(str(inputs.judge_validation))),
    }
    frames = {name: frame for r in runs for name, frame in judged_frames(r, prompts, judge).items()}
    seconds = {"judge": time.perf_counter() - t}
    metrics = {name: m for r in runs for name, m in variant_metrics(r, frames, prompts).items()}
    rates = {name: variant_rates(frame) for name, frame in frames.items()}
    comparisons = compare_variants(frames, goals_of(p))
    gated_goals(comparisons, metrics)
    gates = gating(runs, prompts, params.prompt_gate.n_bootstrap, params.seed)
    for name, v in gates["variants"].items():  # a gated twin: its gate's firing rates and goal
        fired = gates["gates"][v["model"]][v["source"]]["fires"]
        metrics[name]["gate_fires_unsafe"] = fired["unsafe"]["rate"]
        metrics[name].update({f"gate_fires_{k.replace('/', '_')}": f["rate"]
                              for k, f in fired.items() if k.startswith("safe/")})
        if name in comparisons:
            comparisons[name].update(gate_goal(fired))
    labels = prompts["label"]
    details = {
        "split": base.meta["split"],
        "n_prompts": {"unsafe": int((labels == "unsafe").sum()),
                      "safe": int((labels == "safe").sum()),
                      "unsafe_by_source": prompts[labels == "unsafe"]
                      .groupby("source").size().astype(int).to_dict(),
                      "safe_by_source": prompts[labels == "safe"]
                      .groupby("source").size().astype(int).to_dict()},
        "rates": rates,
        "comparisons": comparisons,
        "steering": {**base.meta["steering"], **tuned.meta["steering"],
                     "plans": {**base.meta["plans"], **tuned.meta["plans"]}},
        "finetuned": tuned.meta["finetuned"],
        "judge": judge_figures,
        "gating": gates,
        "generation": base.meta["generation"],
    }
    steer = base.meta["plans"]["steered"]
    heading = f"{base.meta['model']} ({base.meta['split']} split)"
    title = (f"{heading}: base, expert-steered ({steer['n_deactivated']} off, "
             f"{steer['n_activated']} on), fine-tuned "
             f"({tuned.meta['finetuned']['n_experts_trained']} experts) and fine-tuned + steering")
    return SafetyRun(frames, rates, comparisons, metrics, details, heading, title, seconds)


def write(result: SafetyRun, out: Outputs) -> None:
    """Answers, bar plot data and PNG, details and the metrics file, published together
    (core.io.staged_outputs: all or none of them replace the previous run's)."""
    write_timings("eval_safety", result.seconds)
    with staged_outputs() as staged:
        write_parquet(pd.concat(list(result.frames.values()), ignore_index=True),
                      staged(out.answers_judged))
        bar_rows(result.rates).to_csv(staged(out.plot_csv), index=False)
        tradeoff_plot(result.rates, staged(out.tradeoff_png),
                      f"{result.heading}: refusal vs over-refusal per variant")
        bar_plot(result.rates, staged(out.plot_png), result.title)
        write_json(result.details, staged(out.details))
        write_json(headline_metrics(result.metrics, result.rates, result.comparisons),
                   staged(out.metrics))


def table(result: SafetyRun) -> str:
    return results_table(result.rates, result.comparisons)


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    t0 = time.perf_counter()
    result = run(params, inputs)
    write(result, out)
    print(table(result))
    val = result.details["judge"]["validation_set"]
    log.info("judge on %d held-out labels: accuracy %.3f, kappa %.3f, %s; %.1f s", val["n"],
             val["accuracy"], val["cohen_kappa"], val["confusion"], time.perf_counter() - t0)
