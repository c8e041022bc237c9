"""Each variant against its reference on the same prompts (`REFERENCES`): exact McNemar tests
(steerline.core.stats) of the refusal verdicts, the change of each rate in points, and its goal
(steermoe.safety.goals).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from steerline.core.stats import mcnemar_exact
from steerline.steermoe.safety.gated import twin_of
from steerline.steermoe.safety.goals import Goal, goal_entry

#: variant -> the variant it is compared with (paired, same prompts)
REFERENCES = {"steered": "base", "finetuned": "base",
              "finetuned_deactivate": "finetuned", "finetuned_activate": "finetuned"}


def paired_tests(frame: pd.DataFrame, reference: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Exact McNemar tests of a variant's verdicts against its reference's on the same prompts,
    for refusal_unsafe, over_refusal_safe and over_refusal_safe_<source> per safe source."""
    ref = reference.set_index("prompt_id")["refusal"]
    if set(frame["prompt_id"]) != set(ref.index) or len(frame) != len(ref):
        raise ValueError("paired tests need both variants answered on the same prompts")
    safe = frame["label"] == "safe"
    sets = {"refusal_unsafe": frame["label"] == "unsafe", "over_refusal_safe": safe,
            **{f"over_refusal_safe_{src}": safe & (frame["source"] == src)
               for src in sorted(set(frame.loc[safe, "source"]))}}
    out = {}
    for metric, rows in sets.items():
        sub = frame[rows]
        out[metric] = mcnemar_exact(sub["refusal"].to_numpy(),
                                    ref.loc[sub["prompt_id"]].to_numpy())
    return out


def compare_variants(frames: Mapping[str, pd.DataFrame],
                     goals: Mapping[str, Goal]) -> dict[str, Any]:
    """Per variant: its reference, the change of each rate in points with the McNemar test, and
    its goal (`goals`, by variant; a gated twin takes its ungated twin's) with whether it is
    met."""
    out: dict[str, Any] = {}
    for name, frame in frames.items():
        twin = twin_of(name)  # a gated variant: compared with its reference and its twin
        ref_name = REFERENCES.get(twin or name)
        if ref_name is None or ref_name not in frames:
            continue
        tests = paired_tests(frame, frames[ref_name])
        entry: dict[str, Any] = {"reference": ref_name}
        for metric, t in tests.items():
            entry[metric] = {"points": round(t["difference_points"], 2), **t}
        if twin is not None and twin in frames:
            entry["vs_ungated"] = {metric: {"points": round(t["difference_points"], 2), **t}
                                   for metric, t in paired_tests(frame, frames[twin]).items()}
        goal = goals.get(twin or name)
        if goal is not None:
            entry.update(goal_entry(goal, ref_name, tests))
        out[name] = entry
    return out
