"""Dev-split sweep of the SteerMoE safety params: each run = one model (base or a fine-tuned
variant) with an optional steering plan, greedy answers to the DEV prompts of
data/prompts/safety.parquet (never test), judged; one CSV row per run with the rates, their
Wilson 95% intervals and the exact McNemar p against the run's reference. All runs on one model
go through one backend call (vLLM by default: steering plans are per request, so every config
is in flight at once; `--backend transformers` for the reference loop).

    python scripts/safety_dev_sweep.py SPEC.json --out reports/safety_dev_sweep.csv \
        --answers /tmp/sweep_answers.parquet

SPEC.json: a list of runs, each {"name", "model", optional "reference" (an earlier run's name),
optional steering: "experts" (an experts.json) with either "mode" (expert_steering's modes) or
"direction" ("activate" / "deactivate" the unsafe list, as finetuned_steering), "n_experts",
"delta"}. Runs already in the CSV are skipped (a killed sweep resumes); the answers of every run
are kept in --answers (Parquet) for the judge's validation set. The params sweep that
docs/choices.md lists (`dvc exp run --queue -S eval_safety.split=dev ...`) does the same through
the pipeline.
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import AutoTokenizer

from steerline.backends import Steering, make_backend
from steerline.core.chat import render_chat
from steerline.core.io import atomic_path, write_parquet
from steerline.core.stats import mcnemar_exact
from steerline.steering.experts import (
    SteeringPlan,
    directional_plan,
    plan_from_experts,
    read_experts_json,
)
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.safety.prompts import select_eval_prompts
from steerline.steermoe.safety.refusal import make_judge
from steerline.steermoe.safety.verdicts import ANSWER_COLUMNS, variant_rates

log = logging.getLogger("safety_dev_sweep")


def plan_for(run: dict[str, Any], shape: tuple[Any, int, int]) -> SteeringPlan | None:
    """The run's steering plan (None: unsteered); shape = (MoE layers, experts, top_k)."""
    if "experts" not in run:
        return None
    selection = read_experts_json(run["experts"])
    if "direction" in run:
        return directional_plan(selection, run["direction"], run["n_experts"], run["delta"],
                                *shape)
    return plan_from_experts(selection, run["mode"], run["n_experts"], run["delta"], *shape)


def answer_runs(runs: list[dict[str, Any]], prompts: pd.DataFrame, backend_name: str,
                max_new_tokens: int, seed: int) -> dict[str, pd.DataFrame]:
    """Judged greedy answers of every run (all on one model), by run name."""
    model = runs[0]["model"]
    tok = AutoTokenizer.from_pretrained(model)
    chats = [render_chat(tok, t) for t in prompts["text"]]
    judge = make_judge("phrase")
    options = {"seed": seed} if backend_name == "vllm" else {}
    with make_backend(backend_name, model, "float32", **options) as backend:
        shape = (backend.moe_layers or backend.n_layers, backend.n_experts, backend.top_k)
        steering: list[Steering | None] = []
        for run in runs:
            plan = plan_for(run, shape)
            steering += [None if plan is None else Steering(experts=plan)] * len(chats)
        out = backend.generate(chats * len(runs), max_new_tokens, steering=steering)
    frames = {}
    for r, run in enumerate(runs):
        gens = out[r * len(chats): (r + 1) * len(chats)]
        texts = [tok.decode(g.token_ids, skip_special_tokens=True).strip() for g in gens]
        frames[run["name"]] = pd.DataFrame({
            "variant": run["name"], "prompt_id": prompts["prompt_id"].to_numpy(),
            "label": prompts["label"].to_numpy(), "source": prompts["source"].to_numpy(),
            "text": prompts["text"].to_numpy(), "answer": texts,
            "refusal": judge.judge(prompts["text"].tolist(), texts),
            "n_generated": [len(g.token_ids) for g in gens],
            "finished": [bool(g.finished) for g in gens],
        })[ANSWER_COLUMNS]
    return frames


def result_row(run: dict[str, Any], frame: pd.DataFrame, answers: pd.DataFrame) -> dict:
    rates = variant_rates(frame)
    row: dict[str, Any] = {
        "run": run["name"], "model": run["model"],
        "steering": json.dumps({k: run[k] for k in ("mode", "direction", "n_experts", "delta")
                                if k in run}),
        "n_unsafe": rates["refusal_unsafe"]["n"], "n_safe": rates["over_refusal_safe"]["n"]}
    for metric in ("refusal_unsafe", "over_refusal_safe"):
        for key in ("rate", "ci_low", "ci_high"):
            row[f"{metric}_{key.replace('rate', 'pct')}"] = round(100 * rates[metric][key], 2)
    row["reference"] = run.get("reference", "")
    if run.get("reference"):
        ref = answers[answers["variant"] == run["reference"]].set_index("prompt_id")
        if ref.empty:
            raise ValueError(f"run {run['name']!r}: reference {run['reference']!r} has no answers")
        for metric, label in (("refusal_unsafe", "unsafe"), ("over_refusal_safe", "safe")):
            sub = frame[frame["label"] == label]
            t = mcnemar_exact(sub["refusal"].to_numpy(),
                              ref.loc[sub["prompt_id"], "refusal"].to_numpy())
            row[f"{metric}_points_vs_ref"] = round(t["difference_points"], 2)
            row[f"{metric}_mcnemar_p"] = float(f"{t['p_value']:.3g}")
    return row


def plot_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (config, rate): bar label, percent and Wilson 95% bounds (the bar_ci plot)."""
    out = []
    for metric, label in (("refusal_unsafe", "refusal on unsafe"),
                          ("over_refusal_safe", "over-refusal on safe")):
        for r in rows:
            out.append({"bar": f"{label} / {r['run']}", "percent": r[f"{metric}_pct"],
                        "ci_low": r[f"{metric}_ci_low"], "ci_high": r[f"{metric}_ci_high"]})
    return pd.DataFrame(out)


def write_tables(rows: list[dict[str, Any]], out: Path, plot: Path) -> None:
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(plot) as tmp:
        plot_rows(rows).to_csv(tmp, index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path)
    ap.add_argument("--prompts", type=Path, default=Path("data/prompts/safety.parquet"))
    ap.add_argument("--out", type=Path, default=Path("reports/safety_dev_sweep.csv"))
    ap.add_argument("--plot", type=Path, default=Path("reports/safety_dev_sweep_bars.csv"),
                    help="long-form rows for the DVC bar plot with CIs")
    ap.add_argument("--answers", type=Path, required=True)
    ap.add_argument("--backend", choices=("vllm", "transformers"), default="vllm")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rejudge", action="store_true",
                    help="no generation: judge the stored answers again (the current judge) and "
                         "rewrite the tables for every run of the spec")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    runs = json.loads(args.spec.read_text())
    prompts = select_eval_prompts(read_safety_prompts(args.prompts), None, None, args.seed,
                                  split="dev")
    rows = pd.read_csv(args.out).to_dict("records") if args.out.is_file() else []
    answers = pd.read_parquet(args.answers) if args.answers.is_file() else None
    if args.rejudge:
        if answers is None:
            raise ValueError(f"{args.answers} not found: nothing to judge again")
        judge = make_judge("phrase")
        answers["refusal"] = judge.judge(answers["text"].tolist(), answers["answer"].tolist())
        rows = [result_row(run, answers[answers["variant"] == run["name"]], answers)
                for run in runs]
        write_parquet(answers, args.answers)
        write_tables(rows, args.out, args.plot)
        return
    done = {r["run"] for r in rows}
    pending = [r for r in runs if r["name"] not in done]
    for model in dict.fromkeys(r["model"] for r in pending):  # models in spec order
        group = [r for r in pending if r["model"] == model]
        frames = answer_runs(group, prompts, args.backend, args.max_new_tokens, args.seed)
        for run in group:
            answers = (frames[run["name"]] if answers is None
                       else pd.concat([answers, frames[run["name"]]], ignore_index=True))
        for run in group:
            rows.append(result_row(run, frames[run["name"]], answers))
            log.info("%s: %s", run["name"],
                     {k: v for k, v in rows[-1].items() if k.endswith(("pct", "_p"))})
        write_parquet(answers, args.answers)
        write_tables(rows, args.out, args.plot)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"safety_dev_sweep: {err}") from None
