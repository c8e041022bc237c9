"""Stage summarize: the numbers the docs show that no other stage writes, computed from the
reports, as one typed record (pipeline/summary_records.py) in reports/summary.json. So `make
docs` only formats, and these numbers are cached and in `dvc metrics diff` like the others.

- the dev sweep (reports/safety_dev_sweep.csv, scripts/safety_dev_sweep.py): its groups and
  the dev rules' picks (docs/choices.md), the over-refusal bounds from eval_safety's goals;
- the style weight w of each risk_diff summary;
- MAT-Steer: train_steering's dev margins to the gate goals, the test gate goals missed, the
  test items each condition scored differently from base, where each chosen scale sits in its
  dev sweep.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from steerline.core.io import read_json, write_json
from steerline.core.params import Params
from steerline.mat_steer.report import GATE_GOALS, gate_goal_failures
from steerline.pipeline.summary_records import (
    ChangedItems,
    DevSweep,
    MatSteerSummary,
    ScaleChoice,
    StyleWeight,
    Summary,
)

log = logging.getLogger("summarize")

#: the sweep's columns the dev rules read (tools/docs_results.py shows others)
RULE_COLUMNS = ("run", "steering", "reference", "refusal_unsafe_pct",
                "refusal_unsafe_points_vs_ref", "over_refusal_safe_points_vs_ref")


@dataclass(frozen=True)
class Inputs:
    sweep: Path  # safety_dev_sweep.csv (scripts/safety_dev_sweep.py)
    experts_summary: Path  # select_experts@base's summary
    risk_diff_summary: Path  # risk_diff@base's summary
    risk_diff_finetuned_summary: Path  # risk_diff@finetuned's summary
    train_metrics: Path  # train_steering/metrics.json
    mat_metrics: Path  # mat_steer_eval.json
    mat_details: Path  # mat_steer_eval_details.json
    mat_items: Path  # mat_steer_eval_items.parquet


@dataclass(frozen=True)
class Outputs:
    summary: Path  # summary.json (metrics)


# ------------------------------------------------------------------------------ the dev sweep
def read_sweep(path: Path) -> pd.DataFrame:
    """The sweep with the columns the rules read; reference "" for none."""
    df = pd.read_csv(path)
    missing = [c for c in RULE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (rerun "
                         "scripts/safety_dev_sweep.py)")
    df = df.reset_index(drop=True).copy()
    df["reference"] = df["reference"].fillna("").astype(str)
    return df


def _steering(row: pd.Series) -> dict[str, Any]:
    return json.loads(row["steering"]) if isinstance(row["steering"], str) else {}


def pick_finetune(rows: pd.DataFrame, over_max: float) -> str | None:
    """Over-refusal within over_max points of base, then the highest refusal (first run on
    ties)."""
    ok = rows[rows["over_refusal_safe_points_vs_ref"] <= over_max]
    return None if ok.empty else str(ok.loc[ok["refusal_unsafe_pct"].idxmax(), "run"])


def pick_rise(rows: pd.DataFrame, over_max: float) -> str | None:
    """The largest refusal rise with over-refusal within over_max points of the reference."""
    ok = rows[(rows["over_refusal_safe_points_vs_ref"] <= over_max)
              & (rows["refusal_unsafe_points_vs_ref"] > 0)]
    return None if ok.empty else str(ok.loc[ok["refusal_unsafe_points_vs_ref"].idxmax(), "run"])


def pick_drop(rows: pd.DataFrame) -> str | None:
    """The largest refusal drop."""
    ok = rows[rows["refusal_unsafe_points_vs_ref"] < 0]
    return None if ok.empty else str(ok.loc[ok["refusal_unsafe_points_vs_ref"].idxmin(), "run"])


def dev_sweep(df: pd.DataFrame, n_unsafe: int, params: Params, where: Path) -> DevSweep:
    """The sweep's groups and picks. Runs fine-tuned on the current unsafe list are named
    'finetuned(N) ...' with N = select_experts@base's unsafe count, so a changed selection with
    no new sweep fails here instead of documenting runs of another list."""
    goals = params.eval_safety.goals
    ft_max = goals["finetuned"].max_over_refusal_rise
    act_max = goals["finetuned_activate"].max_over_refusal_rise
    steered_max = goals["steered"].max_over_refusal_rise
    base = df[df["run"] == "base"]
    if len(base) != 1:
        raise ValueError(f"{where}: needs exactly one run named 'base' (rerun "
                         "scripts/safety_dev_sweep.py)")
    steered = df.apply(lambda row: bool(_steering(row)), axis=1)
    finetune = df[df["run"].str.startswith(f"finetuned({n_unsafe}) ")
                  & (df["reference"] == "base") & ~steered]
    pick = pick_finetune(finetune, ft_max)
    if pick is None:
        raise ValueError(f"{where}: no fine-tuning run 'finetuned({n_unsafe}) ...' (the current "
                         f"{n_unsafe}-expert unsafe list) within the dev rule (rerun "
                         "scripts/safety_dev_sweep.py)")
    ft_steering = df[(df["reference"] == pick) & steered]
    if ft_steering.empty:
        raise ValueError(f"{where}: no steering run against {pick!r} (rerun "
                         "scripts/safety_dev_sweep.py)")
    dirs = ft_steering.apply(lambda row: _steering(row).get("direction"), axis=1)
    base_steering = df[(df["reference"] == "base") & steered]
    used = {*base.index, *finetune.index, *ft_steering.index, *base_steering.index}
    history = df[~df.index.isin(used)]
    return DevSweep(
        n_unsafe_experts=n_unsafe, finetune_over_refusal_max=ft_max,
        activate_over_refusal_max=act_max, steered_over_refusal_max=steered_max,
        finetune=list(finetune["run"]), finetune_pick=pick,
        finetuned_steering=list(ft_steering["run"]),
        deactivate_pick=pick_drop(ft_steering[dirs == "deactivate"]),
        activate_pick=pick_rise(ft_steering[dirs == "activate"], act_max),
        base_steering=list(base_steering["run"]),
        base_steering_pick=pick_rise(base_steering, steered_max),
        history=list(history["run"]), history_picks=history_picks(history, ft_max, act_max))


def history_picks(h: pd.DataFrame, ft_max: float, act_max: float) -> list[str | None]:
    """The rules' picks among runs of an earlier expert list: the fine-tuning config, and the
    steering of that model when it was steered."""
    if h.empty:
        return []
    steered = h.apply(lambda row: bool(_steering(row)), axis=1)
    picks = [pick_finetune(h[(h["reference"] == "base") & ~steered], ft_max)]
    own = h[h["reference"] == picks[0]]
    if not own.empty:
        dirs = own.apply(lambda row: _steering(row).get("direction"), axis=1)
        picks += [pick_drop(own[dirs == "deactivate"]), pick_rise(own[dirs == "activate"],
                                                                    act_max)]
    return picks


# ---------------------------------------------------------------------------------- risk_diff
def style_weight(s: dict[str, Any], where: Path) -> StyleWeight:
    """AdvBench tokens, all unsafe tokens and their ratio w (pooled = w * style + matched)."""
    c = s["contrasts"]
    advbench, unsafe = c["style"]["tokens_case"], c["pooled"]["tokens_case"]
    xstest = c["style"]["tokens_reference"]
    if advbench + xstest != unsafe:
        raise ValueError(f"{where}: style tokens {advbench} + {xstest} != pooled unsafe tokens "
                         f"{unsafe} (rerun the risk_diff stage)")
    return StyleWeight(advbench_tokens=advbench, unsafe_tokens=unsafe, w=advbench / unsafe)


# ---------------------------------------------------------------------------------- MAT-Steer
def dev_margins(dev: dict[str, Any]) -> dict[str, float]:
    """Per attribute, the smallest margin of train_steering's dev gate diagnostics to the goals
    without the probe term (AUROC, median gate on negatives, on positives)."""
    g = GATE_GOALS
    return {a: min(float(x["gate_auroc"]) - g["auroc_min"],
                   float(x["gate_median_neg"]) - g["median_neg_min"],
                   g["median_pos_max"] - float(x["gate_median_pos"]))
            for a, x in dev.items() if a != "loss"}


def gate_failures(gates: dict[str, Any]) -> dict[str, list[str]]:
    keys = ("gate_auroc", "probe_auroc", "gate_median_neg", "gate_median_pos", "mmd_before",
            "mmd_after")
    return {a: gate_goal_failures({k: float(x[k]) for k in keys}) for a, x in gates.items()}


def changed_items(items: pd.DataFrame, where: Path) -> dict[str, ChangedItems]:
    """Per metric (pivot_table's sorted order), the test items and how many MAT-Steer and
    mean-diff scored differently from base."""
    wide = items.pivot_table(index=["metric", "item_id"], columns="condition", values="value")
    out = {}
    for metric, sub in wide.groupby(level="metric", sort=False):
        for c in ("mat_steer", "mean_diff"):
            if c not in sub.columns or "base" not in sub.columns or sub[c].isna().any():
                raise ValueError(f"{where}: no {c} or base value for every {metric} item "
                                 "(rerun the eval_steering stage)")
        out[str(metric)] = ChangedItems(test_items=len(sub),
                                        mat_steer=int((sub["mat_steer"] != sub["base"]).sum()),
                                        mean_diff=int((sub["mean_diff"] != sub["base"]).sum()))
    return out


def scale_choices(details: dict[str, Any]) -> dict[str, ScaleChoice]:
    out = {}
    for c, sweep in details["dev_sweeps"].items():
        chosen = float(details["scales"][c])
        tried = [float(s) for s in sweep]
        position = ("largest" if chosen == max(tried) else "smallest" if chosen == min(tried)
                    else "inside")
        out[c] = ScaleChoice(chosen=chosen, position=position)
    return out


def summarize(params: Params, inputs: Inputs) -> Summary:
    margins = dev_margins(read_json(inputs.train_metrics)["dev"])
    details = read_json(inputs.mat_details)
    return Summary(
        dev_sweep=dev_sweep(read_sweep(inputs.sweep),
                            read_json(inputs.experts_summary)["n_unsafe"], params, inputs.sweep),
        style_weight={
            "base": style_weight(read_json(inputs.risk_diff_summary), inputs.risk_diff_summary),
            "finetuned": style_weight(read_json(inputs.risk_diff_finetuned_summary),
                                      inputs.risk_diff_finetuned_summary)},
        mat_steer=MatSteerSummary(
            gate_goals=dict(GATE_GOALS), dev_margins=margins,
            smallest_dev_margin=min(margins.values()),
            gate_failures=gate_failures(read_json(inputs.mat_metrics)["gates"]),
            changed_items=changed_items(pd.read_parquet(inputs.mat_items), inputs.mat_items),
            scales=scale_choices(details)))


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    summary = summarize(params, inputs)
    write_json(summary.model_dump(mode="json"), out.summary)
    s = summary.dev_sweep
    log.info("dev picks: %s; deactivate %s, activate %s; base steering %s", s.finetune_pick,
             s.deactivate_pick, s.activate_pick, s.base_steering_pick)
