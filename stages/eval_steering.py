"""Stage eval_steering: base vs mean-difference baselines vs MAT-Steer on each task's test split
(steerline.pipeline.eval_steering has the conditions and the dev choices).
Metrics (reports/mat_steer_eval.json, DVC metrics): TruthfulQA MC1/MC2, BBQ and ToxiGen accuracy
and their average per condition; paired bootstrap 95% CIs over items of the differences; per
attribute the gate's test AUROC beside an L2 logistic probe's (the linear ceiling), gate medians
on pos / neg, MMD(steered neg, pos) before / after. Also: per-item values
(reports/mat_steer_eval_items.parquet), the gate histograms (reports/mat_steer_gate_hist.csv,
`dvc plots`) and details (dev sweeps, item counts, interference verdicts) in
reports/mat_steer_eval_details.json; wall-clock seconds in reports/timings/ (not a DVC output).
"""

from __future__ import annotations

import logging
from pathlib import Path

from steerline.core.params import load_params
from steerline.pipeline import eval_steering as eval_run

INPUTS = eval_run.Inputs(attributes=Path("data/attributes"), activations=Path("data/activations"),
                         checkpoint=Path("models/mat_steer"))
OUTPUTS = eval_run.Outputs(metrics=Path("reports/mat_steer_eval.json"),
                           details=Path("reports/mat_steer_eval_details.json"),
                           items=Path("reports/mat_steer_eval_items.parquet"),
                           hist=Path("reports/mat_steer_gate_hist.csv"))
log = logging.getLogger("eval_steering")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = eval_run.run(load_params(), INPUTS)
    eval_run.write(result, OUTPUTS)
    m = result.metrics
    log.info("gate AUROC %s (probe %s); average %s; done in %.0f s",
             {k: round(v["gate_auroc"], 3) for k, v in m["gates"].items()},
             {k: round(v["probe_auroc"], 3) for k, v in m["gates"].items()},
             {c: round(m[c]["average"], 4) for c in
              ("base", "mean_diff", "single_attribute", "mat_steer")},
             result.seconds["total"])


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(main)
