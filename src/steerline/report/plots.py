"""Every `dvc plots show` plot as a PNG for the report: image plots copied, vega plots drawn
again with matplotlib from their data (DVC renders vega in a browser only)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerline.core.io import atomic_path
from steerline.report.metrics_diff import dvc_executable


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
    dvc = dvc_executable()
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
