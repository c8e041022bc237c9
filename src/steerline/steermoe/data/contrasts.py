"""Which prompts each risk-difference contrast compares, and how far two contrasts agree.

All safe prompts are XSTest; the unsafe ones are AdvBench plus XSTest's unsafe contrast prompts.
A pooled difference therefore mixes safety with dataset style (AdvBench's imperative
instructions vs XSTest's short questions). The contrasts:
- pooled: every unsafe prompt vs every safe prompt (SteerMoE's definition);
- matched: XSTest unsafe vs XSTest safe: the unsafe ones were written as look-alikes of the safe
  ones (same words and form), so what differs is safety, not style;
- style: AdvBench unsafe vs XSTest unsafe: both unsafe, so what differs is style (a diagnostic:
  a safety signal should agree with matched, not with style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# (source, label) of a group of prompts; source None = any source
Group = tuple[str | None, str]


@dataclass(frozen=True)
class Contrast:
    name: str
    prefix: str  # of its report columns ("" for pooled: the historical column names)
    case: tuple[Group, ...]  # the first group (risk_diff > 0: more often routed here)
    reference: tuple[Group, ...]
    inferred: bool  # permutation p-values and bootstrap CIs (else the risk difference only)


POOLED = Contrast("pooled", "", ((None, "unsafe"),), ((None, "safe"),), True)
MATCHED = Contrast("matched", "matched_", (("xstest", "unsafe"),), (("xstest", "safe"),), True)
STYLE = Contrast("style", "style_", (("advbench", "unsafe"),), (("xstest", "unsafe"),), False)
CONTRASTS = (POOLED, MATCHED, STYLE)
REQUIRE_CHOICES = ("pooled", "matched", "both")  # select_experts.require
# Pairs compared by the agreement report (first, second).
AGREEMENT_PAIRS = (("pooled", "matched"), ("pooled", "style"), ("matched", "style"))
AGREEMENT_TOP_N = 50  # size of the highest-risk_diff lists whose overlap is reported


def needs_sources(contrast: Contrast) -> bool:
    return any(src is not None for src, _ in (*contrast.case, *contrast.reference))


def sources_present(contrast: Contrast, source: np.ndarray) -> bool:
    """Some source the contrast names has prompts in `source` [P]: a table of only other
    sources (a user's own) has no matched or style contrast, while one that lacks a side of
    them is an error (contrast_sides)."""
    named = {src for src, _ in (*contrast.case, *contrast.reference) if src is not None}
    return bool(named & set(source.tolist()))


def _in(groups: Sequence[Group], source: np.ndarray | None, label: np.ndarray) -> np.ndarray:
    out = np.zeros(len(label), bool)
    for src, lab in groups:
        hit = label == lab
        if src is not None:
            hit &= source == src
        out |= hit
    return out


def contrast_sides(contrast: Contrast, source: np.ndarray | None, unsafe: np.ndarray) -> np.ndarray:
    """[P] int8: 1 case, 0 reference, -1 not in the contrast. Raises if a side is empty."""
    if needs_sources(contrast) and source is None:
        raise ValueError(f"contrast {contrast.name!r} needs each prompt's source")
    label = np.where(unsafe, "unsafe", "safe")
    case = _in(contrast.case, source, label)
    ref = _in(contrast.reference, source, label)
    named = (("case", case, contrast.case), ("reference", ref, contrast.reference))
    for name, side, groups in named:
        if not side.any():
            raise ValueError(
                f"contrast {contrast.name!r} has no in-scope prompts on its {name} side "
                f"(source, label) in {list(groups)}: check prepare_safety's sources and split"
            )
    return np.where(case, 1, np.where(ref, 0, -1)).astype(np.int8)


def prompt_sources(
    prompt_ids: Sequence[str], unsafe: np.ndarray, prompts: pd.DataFrame, where: str
) -> np.ndarray:
    """[P] source of each routed prompt, joined on prompt_id with the prompt table `prompts`
    (columns prompt_id, label, source). Raises on a repeated prompt_id, a routed prompt missing
    from the table or a label that disagrees with it."""
    missing = [c for c in ("prompt_id", "label", "source") if c not in prompts.columns]
    if missing:
        raise ValueError(f"{where} has no column {missing[0]!r}: rerun prepare_safety")
    # a repeated id is a leak or a merge gone wrong, never a row to drop silently (which copy
    # would give the source?)
    dup = sorted(set(prompts["prompt_id"][prompts["prompt_id"].duplicated()].astype(str)))
    if dup:
        raise ValueError(f"{where} repeats prompt_id {', '.join(dup[:8])}"
                         f"{f' and {len(dup) - 8} more' if len(dup) > 8 else ''}: rerun "
                         "prepare_safety")
    table = prompts.set_index("prompt_id")
    ids = pd.Index(list(prompt_ids))
    absent = ids[~ids.isin(table.index)]
    if len(absent):
        raise ValueError(
            f"routed prompt {absent[0]!r} is not in {where} ({len(absent)} missing): the routing "
            "and the prompts come from different runs; rerun capture_routing"
        )
    rows = table.loc[ids]
    label = np.where(unsafe, "unsafe", "safe")
    clash = np.flatnonzero(rows["label"].to_numpy() != label)
    if clash.size:
        i = int(clash[0])
        raise ValueError(
            f"prompt {ids[i]!r} is {str(label[i])!r} in the routing but "
            f"{str(rows['label'].iloc[i])!r} in "
            f"{where}: rerun capture_routing"
        )
    return rows["source"].astype(str).to_numpy()


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's "average") [N]."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]  # [N] a new value starts here
    dense = first.cumsum()
    count = np.r_[np.flatnonzero(first), len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = 0.5 * (count[dense] + count[dense - 1] + 1)
    return ranks


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """scipy.stats.spearmanr(first, second).statistic, value for value (the Pearson
    correlation of the average ranks, as its np.corrcoef computes it; NaN for a NaN or a
    constant input), without importing scipy.stats (a second of the risk_diff stage's start)."""
    a = np.column_stack((first, second)).astype(np.float64)  # [N, 2]
    if len(a) <= 1 or np.isnan(a).any() or (a[0] == a).all(axis=0).any():
        return float("nan")
    ranked = np.column_stack((average_ranks(a[:, 0]), average_ranks(a[:, 1])))
    return float(np.corrcoef(ranked, rowvar=False)[1, 0])


def agreement(first: np.ndarray, second: np.ndarray, top_n: int = AGREEMENT_TOP_N) -> dict:
    """Spearman correlation over all pairs and the overlap of the top_n highest of each."""
    rho = spearman(first, second)
    n = min(top_n, len(first))
    top_a = set(np.argsort(-first, kind="stable")[:n].tolist())
    top_b = set(np.argsort(-second, kind="stable")[:n].tolist())
    return {"spearman": rho, f"top{top_n}_overlap": len(top_a & top_b)}
