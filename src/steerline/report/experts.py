"""The report's selected-experts section: models/experts.json's lists and each contrast's top
experts of reports/risk_diff.parquet, with risk_diff, CI and q."""

from __future__ import annotations

import json
from pathlib import Path

from steerline.core.tables import fmt, md_table, with_ci


def experts_section(root: Path, top: int) -> str:
    from steerline.steermoe.detection.expert_table import (
        contrasts,
        read_risk_diff,
        table_rows,
        top_experts,
    )

    path = root / "reports/risk_diff.parquet"
    try:
        df = read_risk_diff(path)
        have = contrasts(df)
    except (FileNotFoundError, ValueError) as err:
        return f"n/a: {err}\n"
    selected: set[tuple[int, int]] = set()
    sel_path = root / "models/experts.json"
    if sel_path.is_file():
        try:
            sel = json.loads(sel_path.read_text())
            selected = {(int(a), int(b)) for side in ("unsafe", "safe")
                        for a, b in sel.get(side, [])}
        except (ValueError, TypeError, AttributeError):
            selected = set()
    parts = [f"Contrasts in the report: {', '.join(have)}; `selected` = listed in "
             f"models/experts.json{'' if sel_path.is_file() else ' (n/a: file not found)'}."]
    if sel_path.is_file():
        parts.append(selected_table(df, sel_path, top))
    for contrast in have:
        try:
            table = top_experts(df, top, contrast)
        except ValueError as err:
            parts.append(f"{contrast}: n/a ({err})")
            continue
        header, rows = table_rows(table)
        marks = ["yes" if (int(r.layer), int(r.expert)) in selected else ""
                 for r in table.itertuples()]
        parts.append(f"**{contrast}** (top {top} each way)\n\n"
                     + md_table([*header, "selected"],
                                [[*r, m] for r, m in zip(rows, marks, strict=True)]))
    return "\n\n".join(parts) + "\n"


def selected_table(df, sel_path: Path, top: int) -> str:
    """The first `top` experts of each list of models/experts.json (select_experts' rank order)
    with the pooled risk_diff, its CI and q, and every other contrast's risk_diff."""
    from steerline.steermoe.detection.expert_table import POOLED, Q_COLUMNS, contrasts

    try:
        sel = json.loads(sel_path.read_text())
        lists = {side: [(int(a), int(b)) for a, b in sel.get(side, [])]
                 for side in ("unsafe", "safe")}
    except (ValueError, TypeError, AttributeError) as err:
        return f"n/a: {sel_path} is not a valid experts list ({err})"
    others = [c for c in contrasts(df) if c != POOLED]
    q_col = next((c for c in Q_COLUMNS if c in df.columns), None)
    index = df.set_index(["layer", "expert"])
    header = ["side", "#", "layer", "expert", "risk_diff", "95% CI", f"q ({q_col or 'n/a'})",
              *[f"{c} risk_diff" for c in others]]

    def value(pair: tuple[int, int], col: str | None) -> float | None:
        if col is None or pair not in index.index or col not in index.columns:
            return None
        return float(index.loc[pair, col])

    rows = []
    for side, pairs in lists.items():
        for rank, pair in enumerate(pairs[:top], 1):
            ci = with_ci("", value(pair, "ci_low"), value(pair, "ci_high")).strip()
            rows.append([side, str(rank), str(pair[0]), str(pair[1]),
                         fmt(value(pair, "risk_diff")), ci or "n/a", fmt(value(pair, q_col)),
                         *[fmt(value(pair, f"{c}_risk_diff")) for c in others]])
    n = {side: len(pairs) for side, pairs in lists.items()}
    return (f"**selected by select_experts** ({n['unsafe']} unsafe, {n['safe']} safe; first "
            f"{top} of each list)\n\n" + md_table(header, rows))
