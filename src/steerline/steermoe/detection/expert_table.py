"""The top experts of reports/risk_diff.parquet as a table, for `steerline experts` and the CI
report: per side (unsafe = highest risk_diff, safe = lowest) the first N (layer, expert) pairs
with risk_diff, its CI and q-value, for any contrast the report holds.

Contrasts are read from the column names: the pooled contrast's columns are unprefixed
(risk_diff, ci_low, ci_high, q_perm, ...), another contrast's carry its name as a prefix
(matched_risk_diff, ...). The q-value is the prompt-level one (q_perm) when the report has it,
else the token-level one (q_token_z, or q_value in older reports); missing columns read as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from steerline.core.tables import fmt, md_table

POOLED = "pooled"
Q_COLUMNS = ("q_perm", "q_token_z", "q_value")  # preference order
TABLE_COLUMNS = ("side", "rank", "layer", "expert", "risk_diff", "ci_low", "ci_high", "q", "q_kind")


def contrasts(df: pd.DataFrame) -> list[str]:
    """Contrasts present in a risk_diff report: pooled first, then each `<name>_risk_diff`."""
    if "risk_diff" not in df.columns:
        raise ValueError("the risk_diff report has no 'risk_diff' column: rerun the risk_diff "
                         "stage (dvc repro risk_diff)")
    names = [c[: -len("_risk_diff")] for c in df.columns if c.endswith("_risk_diff")]
    return [POOLED, *sorted(names)]


def read_risk_diff(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run the risk_diff stage (dvc repro risk_diff)")
    df = pd.read_parquet(p)
    for col in ("layer", "expert"):
        if col not in df.columns:
            raise ValueError(f"{p} has no {col!r} column: rerun the risk_diff stage")
    return df


def top_experts(df: pd.DataFrame, top: int, contrast: str = POOLED) -> pd.DataFrame:
    """The `top` highest (side unsafe) and lowest (side safe) risk_diff pairs of `contrast`,
    ties by (layer, expert); columns TABLE_COLUMNS (NaN where the report lacks a value)."""
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    have = contrasts(df)
    if contrast not in have:
        raise ValueError(f"contrast {contrast!r} is not in the risk_diff report; it has "
                         f"{', '.join(have)}")
    pre = "" if contrast == POOLED else f"{contrast}_"
    col = {k: f"{pre}{k}" for k in ("risk_diff", "ci_low", "ci_high", *Q_COLUMNS)}
    q_kind = next((k for k in Q_COLUMNS if col[k] in df.columns), None)
    base = pd.DataFrame({
        "layer": df["layer"].astype(int), "expert": df["expert"].astype(int),
        "risk_diff": df[col["risk_diff"]].astype(float),
        "ci_low": df[col["ci_low"]].astype(float) if col["ci_low"] in df else math.nan,
        "ci_high": df[col["ci_high"]].astype(float) if col["ci_high"] in df else math.nan,
        "q": df[col[q_kind]].astype(float) if q_kind else math.nan,
        "q_kind": q_kind or "n/a",
    }).dropna(subset=["risk_diff"])
    parts = []
    for side, ascending in (("unsafe", False), ("safe", True)):
        sub = base[base["risk_diff"] > 0] if side == "unsafe" else base[base["risk_diff"] < 0]
        sub = sub.sort_values(["risk_diff", "layer", "expert"],
                              ascending=[ascending, True, True], kind="stable").head(top)
        parts.append(sub.assign(side=side, rank=range(1, len(sub) + 1)))
    return pd.concat(parts, ignore_index=True)[list(TABLE_COLUMNS)]


def table_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows of strings) of a top_experts table."""
    q_kind = str(table["q_kind"].iloc[0]) if len(table) else "n/a"
    header = ["side", "#", "layer", "expert", "risk_diff", "95% CI", f"q ({q_kind})"]
    rows = []
    for r in table.itertuples():
        ci = ("n/a" if math.isnan(r.ci_low) or math.isnan(r.ci_high)
              else f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]")
        rows.append([r.side, str(r.rank), str(r.layer), str(r.expert), fmt(r.risk_diff), ci,
                     fmt(r.q)])
    return header, rows


def render(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """A plain-text (aligned) or Markdown table."""
    if markdown:
        return md_table(header, rows)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)
