"""Stage eval_safety: on one split of the safety prompts (test by default, read once; dev for the
params sweep), base, steered, finetuned, finetuned_deactivate and finetuned_activate answer the
same prompts (steerline.pipeline.eval_safety has the variants and engines).
Writes reports/safety_eval.json (DVC metrics: rates, Wilson 95% bounds, McNemar p vs the
reference), reports/safety_eval_details.json (every rate with k, n and its interval, the paired
tests, goals, plans, the judge's agreement on its design labels and on the held-out validation
labels), per-prompt answers (reports/safety_eval_answers.parquet), a bar plot PNG with the
intervals and the DVC bar-plot data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from steerline.core.params import load_params
from steerline.pipeline import eval_safety as safety_run

INPUTS = safety_run.Inputs(
    prompts=Path("data/prompts/safety.parquet"),
    experts=Path("models/experts.json"),
    experts_finetuned=Path("models/experts_finetuned.json"),  # on the fine-tuned routing
    risk_diff=Path("reports/risk_diff.parquet"),
    labels=Path("data/judge/refusal_labels.jsonl"),  # the judge's design set
    judge_validation=Path("data/judge/refusal_validation.jsonl"),  # held out from its design
)
OUTPUTS = safety_run.Outputs(
    metrics=Path("reports/safety_eval.json"),
    details=Path("reports/safety_eval_details.json"),
    answers=Path("reports/safety_eval_answers.parquet"),
    plot_png=Path("reports/safety_eval.png"),
    plot_csv=Path("reports/safety_eval_bars.csv"),
)

log = logging.getLogger("eval_safety")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    params = load_params()
    result = safety_run.run(params, INPUTS)
    safety_run.write(result, params, OUTPUTS)
    print(safety_run.table(result))
    val = result.details["judge"]["validation_set"]
    log.info("judge on %d held-out labels: accuracy %.3f, kappa %.3f, %s; %.1f s", val["n"],
             val["accuracy"], val["cohen_kappa"], val["confusion"], time.perf_counter() - t0)


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(main)
