"""What changed against the base commit, item by item: both runs scored the same MAT-Steer test
items and the same safety test prompts, so each headline metric's change gets a paired test
(a paired bootstrap 95% CI over MC items, an exact McNemar test of refusal verdicts), marked
significant or not. This is the answer to "did my `dvc exp run -S ...` matter?", which the raw
`dvc metrics diff` (about 80 numbers, each CI as wide as the changes) does not give.

The base run's per-item files are read with `dvc.api.open(rev=base)`: git-tracked ones from
git, DVC-cached ones (the safety answers) from the local DVC cache, which holds them after the
base commit was reproduced here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steerline.core.stats import mcnemar_exact, round_p
from steerline.mat_steer.report import compare

MAT_ITEMS = "reports/mat_steer_eval_items.parquet"
SAFETY_ANSWERS = "reports/safety_eval_answers.parquet"
ALPHA = 0.05  # two-sided
MAT_CONDITIONS = ("mat_steer", "mean_diff", "single_attribute", "base")


def read_at(root: Path, path: str, rev: str) -> pd.DataFrame:
    """A Parquet output as the commit `rev` recorded it (git or the DVC cache)."""
    import dvc.api

    with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))


Rows = list[list[str]]


def mat_changes(new: pd.DataFrame, old: pd.DataFrame, n_boot: int, seed: int
                ) -> tuple[Rows, list[str]]:
    """Per condition and metric (and their average): old mean, new mean, new - old with its
    paired bootstrap CI over the items both runs scored; and the conditions whose every item
    value is unchanged (no rows for them)."""
    rows, same = [], []
    for cond in [c for c in MAT_CONDITIONS if c in set(new["condition"])]:
        a, b = new[new["condition"] == cond], old[old["condition"] == cond]
        both = a.merge(b, on=["metric", "item_id"], suffixes=("_new", "_old"))
        metrics = list(dict.fromkeys(both["metric"]))
        if not metrics:
            continue
        if np.array_equal(both["value_new"].to_numpy(), both["value_old"].to_numpy()):
            same.append(cond)
            continue
        new_v = {m: both.loc[both["metric"] == m, "value_new"].to_numpy() for m in metrics}
        old_v = {m: both.loc[both["metric"] == m, "value_old"].to_numpy() for m in metrics}
        ci = compare(new_v, old_v, n_boot, seed)
        means_old = {m: float(np.mean(v)) for m, v in old_v.items()}
        means_new = {m: float(np.mean(v)) for m, v in new_v.items()}
        means_old["average"] = float(np.mean(list(means_old.values())))
        means_new["average"] = float(np.mean(list(means_new.values())))
        for m in [*metrics, "average"]:
            c = ci[m]
            moved = c["lo"] > 0 or c["hi"] < 0
            rows.append([cond, m, f"{means_old[m]:.3f}", f"{means_new[m]:.3f}",
                         f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]", "",
                         "**yes**" if moved else "no"])
    return rows, same


def safety_changes(new: pd.DataFrame, old: pd.DataFrame) -> tuple[Rows, list[str]]:
    """Per variant: refusal on the unsafe prompts and over-refusal on the safe ones, old and new,
    the change in points and the exact McNemar p on the prompts both runs answered; and the
    variants whose every verdict is unchanged (no rows for them)."""
    rows, same = [], []
    both = new.merge(old, on=["variant", "prompt_id"], suffixes=("_new", "_old"))
    for variant in dict.fromkeys(both["variant"]):
        v = both[both["variant"] == variant]
        if np.array_equal(v["refusal_new"].to_numpy(), v["refusal_old"].to_numpy()):
            same.append(str(variant))
            continue
        for label, name in (("unsafe", "refusal (unsafe)"), ("safe", "over-refusal (safe)")):
            g = v[v["label_new"] == label]
            if g.empty:
                continue
            t = mcnemar_exact(g["refusal_new"].to_numpy(), g["refusal_old"].to_numpy())
            moved = t["p_value"] < ALPHA
            rows.append([variant, name, f"{100 * g['refusal_old'].mean():.1f}%",
                         f"{100 * g['refusal_new'].mean():.1f}%",
                         f"{t['difference_points']:+.1f} points", f"{round_p(t['p_value'])}",
                         "**yes**" if moved else "no"])
    return rows, same


def section(root: Path, base: str, table: Callable[[list[str], Rows], str],
            params: Mapping[str, Any]) -> str:
    """The report's first section: the paired changes against `base` (or why not available),
    with eval_steering's bootstrap (`eval_steering.n_bootstrap` draws from `seed`)."""
    try:
        n_boot, seed = int(params["eval_steering"]["n_bootstrap"]), int(params["seed"])
    except (KeyError, TypeError, ValueError):
        return "n/a: params.yaml lacks eval_steering.n_bootstrap or seed\n"
    header = ["condition / variant", "metric", base, "workspace", "change [95% CI]", "p",
              "significant"]
    parts, notes = [], []
    def mat_items(new: pd.DataFrame, old: pd.DataFrame) -> tuple[Rows, list[str]]:
        return mat_changes(new, old, n_boot, seed)

    for path, fn, what in ((MAT_ITEMS, mat_items, "MAT-Steer test items"),
                           (SAFETY_ANSWERS, safety_changes, "safety test prompts")):
        mine = root / path
        if not mine.is_file():
            notes.append(f"{path}: not in the workspace (run `dvc repro`)")
            continue
        try:
            old = read_at(root, path, base)
        except Exception as err:  # noqa: BLE001 (a missing rev, file or cache entry: say so)
            notes.append(f"{path} at {base}: not available ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})")
            continue
        rows, same = fn(pd.read_parquet(mine), old)
        moved = [f"{r[0]} {r[1]}" for r in rows if r[-1] != "no"]
        line = (f"**{what}**: {len(moved)} of {len(rows)} changed metrics significant"
                + (f" ({', '.join(moved)})" if moved else "")
                + (f"; every item unchanged: {', '.join(same)}" if same else ""))
        parts.append(line)
        if rows:
            parts.append(table(header, rows))
    if not parts:
        return "n/a: " + "; ".join(notes) + "\n"
    text = "\n\n".join(parts)
    return text + ("\n\n" + "; ".join(notes) if notes else "") + "\n"
