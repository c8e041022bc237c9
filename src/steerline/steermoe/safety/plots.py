"""The safety evaluation's figures: a grouped bar chart of the two headline rates per variant
(PNG, and its rows for the DVC bar plot), and refusal against over-refusal per variant (PNG), each
with Wilson 95% intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from steerline.core.io import atomic_path
from steerline.steermoe.safety.gated import twin_of


def bar_rows(rates: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """Rows for the DVC bar plot: one per (variant, refusal metric), value and Wilson 95% bounds
    in percent."""
    rows = []
    for metric, label in (("refusal_unsafe", "refusal on unsafe"),
                          ("over_refusal_safe", "over-refusal on safe")):
        for name, r in rates.items():
            rows.append({"bar": f"{label} / {name}", "percent": round(100 * r[metric]["rate"], 2),
                         "ci_low": round(100 * r[metric]["ci_low"], 2),
                         "ci_high": round(100 * r[metric]["ci_high"], 2)})
    return pd.DataFrame(rows)


def bar_plot(rates: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Any,
             title: str) -> None:
    """Grouped bar chart (PNG) of refusal on unsafe and over-refusal on safe per variant, with
    Wilson 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rates)
    groups = [("refusal_unsafe", "refusal on unsafe prompts"),
              ("over_refusal_safe", "over-refusal on safe prompts")]
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(names):
        vals = np.array([100 * rates[name][g]["rate"] for g, _ in groups])
        err = np.array([[vals[j] - 100 * rates[name][g]["ci_low"],
                         100 * rates[name][g]["ci_high"] - vals[j]]
                        for j, (g, _) in enumerate(groups)]).T  # [2, groups]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name,
                      yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(x, [g for _, g in groups])
    ax.set_ylabel("% of prompts (judge: refusal), Wilson 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def tradeoff_plot(rates: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Any,
                  title: str) -> None:
    """Refusal on unsafe prompts against over-refusal on safe ones, one point per variant with
    its Wilson 95% intervals on both axes; an arrow joins each gated twin to its ungated variant
    (the goal of a gate: keep the refusal, move left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = {}
    for name, r in rates.items():
        u, s = r["refusal_unsafe"], r["over_refusal_safe"]
        x, y = 100 * s["rate"], 100 * u["rate"]
        pts[name] = (x, y)
        ax.errorbar(x, y, xerr=[[x - 100 * s["ci_low"]], [100 * s["ci_high"] - x]],
                    yerr=[[y - 100 * u["ci_low"]], [100 * u["ci_high"] - y]], fmt="o",
                    capsize=2, elinewidth=0.7, label=name, alpha=0.9)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for name, (x, y) in pts.items():
        twin = twin_of(name)
        if twin in pts:
            tx, ty = pts[twin]
            ax.annotate("", (x, y), (tx, ty), arrowprops={"arrowstyle": "->", "color": "grey",
                                                          "lw": 0.8})
    ax.set_xlabel("over-refusal on safe prompts, % (Wilson 95% CI)")
    ax.set_ylabel("refusal on unsafe prompts, % (Wilson 95% CI)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
