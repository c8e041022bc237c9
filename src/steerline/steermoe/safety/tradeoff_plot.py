"""Refusal on unsafe prompts against over-refusal on safe ones, one point per variant with its
Wilson 95% intervals on both axes; an arrow joins each gated twin to its ungated variant (the
goal of a gate: keep the refusal, move left)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerline.core.io import atomic_path
from steerline.steermoe.safety.gated import twin_of


def tradeoff_plot(rates: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Any,
                  title: str) -> None:
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
