"""The CI report, DVC's convention (what CML's `cml comment create` posts): reports/report.md
with, first, what changed against a base commit item by item with a paired test per headline
metric (report/paired.py), then `dvc metrics diff --md` against it, the selected experts (top N
each way with risk_diff, CI and q), the safety and MAT-Steer tables with their confidence
intervals, and every `dvc plots` plot as a PNG beside it (reports/report_plots/). Built from
local files only.

    python -m steerline.report [--base main] [--out reports/report.md]   (`make report`)

Inputs are read as they are: a missing file or column shows as "n/a" with the stage that writes
it, never an error (the report is also built after a partial run).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerline.core.io import atomic_path
from steerline.report import paired

LO_KEYS = ("ci_low", "lo", "low", "ci_lo", "lower")
HI_KEYS = ("ci_high", "hi", "high", "ci_hi", "upper")
VALUE_KEYS = ("rate", "value", "mean", "estimate", "diff", "difference", "delta", "point")


# ---------------------------------------------------------------------------------- formatting
def fmt(x: Any, digits: int = 3) -> str:
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


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((d[k] for k in keys if k in d), None)


def with_ci(value: Any, lo: Any, hi: Any) -> str:
    if lo is None or hi is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


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


# ------------------------------------------------------------------------------------- sections
def metrics_diff(base: str, root: Path) -> str:
    """`dvc metrics diff BASE --md`, or why it is not available."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    try:
        res = subprocess.run([dvc, "metrics", "diff", base, "--md"], cwd=root,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"n/a: `dvc metrics diff` could not run ({err})\n"
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
        return f"n/a: `dvc metrics diff {base} --md` failed: {msg}\n"
    table = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
    if len(table) <= 2:  # only the header: nothing differs
        return f"No metric changed vs {base}.\n"
    return "\n".join(table) + "\n"


def base_ref(root: Path, wanted: str | None) -> str:
    """The base of the diff: `wanted`, else the branch main when it exists, else HEAD."""
    if wanted:
        return wanted
    ok = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "main"], cwd=root,
                        capture_output=True).returncode == 0
    return "main" if ok else "HEAD"


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


# ---------------------------------------------------------------------------------------- plots
def _walk(node: Any):
    if isinstance(node, Mapping):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _field(spec: Mapping[str, Any], axis: str) -> dict[str, Any] | None:
    for node in _walk(spec):
        enc = node.get("encoding")
        if isinstance(enc, Mapping) and isinstance(enc.get(axis), Mapping):
            ch = enc[axis]
            if "field" in ch and "aggregate" not in ch:
                return dict(ch)
    return None


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def draw_vega(spec: Mapping[str, Any], title: str, out: Path) -> bool:
    """A PNG of a DVC vega plot from its data: horizontal bars (with ci_low / ci_high error bars
    when the data has them) or lines per series (file / field); False when it cannot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = spec.get("data", {}).get("values") or []
    xf, yf = _field(spec, "x"), _field(spec, "y")
    if not values or xf is None or yf is None:
        return False
    bar = any(n.get("mark") == "bar" or (isinstance(n.get("mark"), Mapping)
                                         and n["mark"].get("type") == "bar") for n in _walk(spec))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if bar:
        cat, num = (yf, xf) if yf.get("type") == "nominal" else (xf, yf)
        labels = [str(v.get(cat["field"], "")) for v in values]
        nums = [_number(v.get(num["field"])) for v in values]
        lo = [_number(v.get("ci_low")) for v in values]
        hi = [_number(v.get("ci_high")) for v in values]
        pos = range(len(values))
        ax.barh(list(pos), nums, color="#945dd6")
        if not any(math.isnan(a) or math.isnan(b) for a, b in zip(lo, hi, strict=True)):
            ax.errorbar(nums, list(pos), xerr=[[n - a for n, a in zip(nums, lo, strict=True)],
                                               [b - n for n, b in zip(nums, hi, strict=True)]],
                        fmt="none", ecolor="black", capsize=2, lw=0.8)
        ax.set_yticks(list(pos), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(str(num.get("title") or num["field"]))
    else:
        ykey = yf["field"]
        series_key = next((k for k in ("field", "filename") if len({str(v.get(k)) for v in values})
                           > 1), None)
        groups: dict[str, list[tuple[float, float]]] = {}
        for v in values:
            y = v.get(ykey, v.get("dvc_inferred_y_value"))
            name = str(v.get(series_key)) if series_key else str(yf.get("title") or ykey)
            groups.setdefault(name, []).append((_number(v.get(xf["field"])), _number(y)))
        for name, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.2)
        if len(groups) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel(str(xf.get("title") or xf["field"]))
        ax.set_ylabel(str(yf.get("title") or ykey))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:80] or "plot"


def plots_section(root: Path, out_dir: Path, rel: str) -> str:
    """Every plot of `dvc plots show --json` as a PNG in out_dir, as Markdown images."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    scratch = out_dir.with_name(out_dir.name + ".dvc_plots")
    try:
        res = subprocess.run([dvc, "plots", "show", "--json", "-o", str(scratch)], cwd=root,
                             capture_output=True, text=True, timeout=300)
        data = json.loads(res.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as err:
        return f"n/a: `dvc plots show --json` failed ({err})\n"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    lines, missing = [], []
    plots = data.get("data", data) if isinstance(data, Mapping) else {}
    for name, entries in plots.items():
        entry = entries[0] if isinstance(entries, list) and entries else None
        if entry is None:
            continue
        png = out_dir / f"{slug(name)}.png"
        ok = False
        if entry.get("type") == "image" and Path(str(entry.get("url"))).is_file():
            shutil.copy(entry["url"], png)
            ok = True
        elif entry.get("type") == "vega":
            spec = entry.get("content") or {}
            title = spec.get("title", {})
            title = title.get("text", name) if isinstance(title, Mapping) else str(title or name)
            ok = draw_vega(spec, title, png)
        if ok:
            lines.append(f"![{name}]({rel}/{png.name})")
        else:
            missing.append(name)
    for err in data.get("errors", []) if isinstance(data, Mapping) else []:
        missing.append(f"{err.get('name', '?')} ({err.get('type', 'error')})")
    shutil.rmtree(scratch, ignore_errors=True)
    text = "\n\n".join(lines)
    if missing:
        text += "\n\nn/a (not produced yet, or no data): " + ", ".join(sorted(set(missing)))
    return text + "\n"


# ---------------------------------------------------------------------------------------- build
def _params(root: Path) -> dict[str, Any]:
    """params.yaml as a dict ({} when missing or unreadable: the report never fails on it)."""
    import yaml

    from steerline.core.params import load_yaml

    try:
        return load_yaml(root / "params.yaml") or {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: aliases past the size limit
        return {}


def build(root: Path, out: Path, base: str | None, top: int) -> str:
    ref = base_ref(root, base)
    plots_dir = out.with_name(out.stem + "_plots")
    sections = [
        "# steerline report",
        f"## What changed vs {ref} (paired, the same test items)\n\n"
        + paired.section(root, ref, md_table, _params(root)),
        f"## Metrics: `dvc metrics diff {ref} --md`\n\n" + metrics_diff(ref, root),
        "## Selected experts (reports/risk_diff.parquet)\n\n" + experts_section(root, top),
        "## Safety evaluation (reports/safety_eval.json)\n\n"
        + json_tables(root / "reports/safety_eval.json", "eval_safety"),
        "## MAT-Steer evaluation (reports/mat_steer_eval.json)\n\n"
        + json_tables(root / "reports/mat_steer_eval.json", "eval_steering"),
        "## Plots (`dvc plots show`)\n\n" + plots_section(root, plots_dir, plots_dir.name),
    ]
    text = "\n\n".join(s.rstrip() for s in sections) + "\n"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m steerline.report", description=__doc__)
    ap.add_argument("--base", help="commit to diff the metrics against (default: main, else "
                                   "HEAD)")
    ap.add_argument("--out", default="reports/report.md")
    ap.add_argument("--top", type=int, default=10, help="experts per side (default 10)")
    ap.add_argument("--root", default=".", help="the project checkout (default: .)")
    args = ap.parse_args(argv)
    if args.top < 1:
        sys.exit(f"report: --top must be >= 1, got {args.top}")
    root = Path(args.root)
    if not (root / "dvc.yaml").is_file():
        sys.exit(f"report: {root / 'dvc.yaml'} not found: run from the project root or pass "
                 "--root")
    out = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    text = build(root, out, args.base, args.top)
    print(f"wrote {out} ({len(text.splitlines())} lines) and {out.stem}_plots/")

