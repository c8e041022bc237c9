"""Markdown tables and the number formats in their cells: the one renderer of the CI report
(steerline.report), `steerline experts` / `steerline detect` and the docs (tools/docs_results.py).

It lives in core, the lowest layer they all may import (steermoe, cli and report do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; a `|` in a cell is escaped (a header is written as given)."""
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def fmt(x: Any, digits: int = 3) -> str:
    """Any report value: None / NaN as n/a, bools as true / false, ints whole, floats with
    `digits` decimals (scientific below 10**-digits, where tiny q-values sit), the rest as str."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.1e}"
        return f"{x:.{digits}f}"
    return str(x)


def with_ci(value: Any, lo: Any, hi: Any) -> str:
    """'v [lo, hi]' in fmt's format; just v when either bound is missing."""
    if lo is None or hi is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def f3(x: float) -> str:
    """Three decimals whatever the size (the docs' accuracies, AUROCs, KLs)."""
    return f"{x:.3f}"


def pct(x: float) -> str:
    """A rate in [0, 1] as percent, one decimal."""
    return f"{100 * x:.1f}"


def signed(x: float, digits: int) -> str:
    """+0.123 / -0.123, and 0.000 (no sign) for what rounds to zero."""
    s = f"{x:+.{digits}f}"
    return f"{0:.{digits}f}" if float(s) == 0 else s


def p_value(p: float) -> str:
    """Two significant digits; scientific below 0.01 (9.5e-07, 7.3e-04)."""
    return f"{p:.2g}" if p >= 0.01 else f"{p:.1e}"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
