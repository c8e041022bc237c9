"""Metrics JSON files as Markdown tables for the CI report: a metric and its `<m>_ci_low` /
`<m>_ci_high` (or {value, lo, hi, p...}) siblings in one 'v [lo, hi]' cell."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerline.core.tables import fmt, md_table, with_ci

LO_KEYS = ("ci_low", "lo", "low", "ci_lo", "lower")
HI_KEYS = ("ci_high", "hi", "high", "ci_hi", "upper")
VALUE_KEYS = ("rate", "value", "mean", "estimate", "diff", "difference", "delta", "point")


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((d[k] for k in keys if k in d), None)


def cell(value: Any) -> str:
    """A metric value: a number, or a {value/rate/mean, ci_low/lo, ci_high/hi, ...} dict shown
    as 'v [lo, hi]' (other keys, e.g. a p-value, after it)."""
    if not isinstance(value, Mapping):
        return fmt(value)
    v, lo, hi = _first(value, VALUE_KEYS), _first(value, LO_KEYS), _first(value, HI_KEYS)
    if v is None and lo is None:
        return ", ".join(f"{k} {fmt(x)}" for k, x in value.items() if not isinstance(x, Mapping))
    rest = [f"{k} {fmt(x)}" for k, x in value.items()
            if k not in (*VALUE_KEYS, *LO_KEYS, *HI_KEYS) and not isinstance(x, (Mapping, list))
            and (k.startswith("p") or k.startswith("q"))]
    return with_ci(v, lo, hi) + (f" ({', '.join(rest)})" if rest else "")


def metric_rows(obj: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows = the keys of `obj` whose values are dicts; columns = their metrics, where the
    `<m>_ci_low` / `<m>_ci_high` (or _lo / _hi) siblings of a metric m join its cell."""
    rows = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
    suffixes = [f"_{s}" for s in (*LO_KEYS, *HI_KEYS)]
    metrics: list[str] = []
    for v in rows.values():
        for m in v:
            if not any(m.endswith(s) for s in suffixes) and m not in metrics:
                metrics.append(m)
    out = []
    for name, v in rows.items():
        line = [name]
        for m in metrics:
            if m not in v:
                line.append("n/a")
                continue
            lo = next((v[f"{m}_{s}"] for s in LO_KEYS if f"{m}_{s}" in v), None)
            hi = next((v[f"{m}_{s}"] for s in HI_KEYS if f"{m}_{s}" in v), None)
            line.append(with_ci(v[m], lo, hi) if lo is not None else cell(v[m]))
        out.append(line)
    return ["", *metrics], out


def json_tables(path: Path, stage: str) -> str:
    """Markdown tables of a metrics JSON: one for its top-level dicts of scalars (rows), one per
    top-level dict of dicts (titled by its key)."""
    if not path.is_file():
        return f"n/a: {path} not found (run the {stage} stage)\n"
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return f"n/a: {path} is not valid JSON ({err})\n"
    flat = {k: v for k, v in obj.items()
            if isinstance(v, Mapping) and not all(isinstance(x, Mapping) for x in v.values())}
    nested = {k: v for k, v in obj.items()
              if isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values())}
    scalars = {k: v for k, v in obj.items() if not isinstance(v, (Mapping, list))}
    parts = []
    if flat:
        parts.append(md_table(*metric_rows(flat)))
    for key, sub in nested.items():
        parts.append(f"**{key}**\n\n" + md_table(*metric_rows(sub)))
    if scalars:
        parts.append(md_table(["key", "value"], [[k, fmt(v)] for k, v in scalars.items()]))
    return "\n\n".join(parts) + "\n" if parts else f"n/a: {path} holds no table\n"
