"""Pictures of a risk_diff report: the layer x expert heatmap PNG and the rows of the top-pairs
bar plot (DVC plots)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
import pandas as pd

from steerline.steermoe.data.contrasts import CONTRASTS, MATCHED
from steerline.steermoe.routing.schema import META_MODEL, META_N_EXPERTS, moe_layers_of


def plot_rows(df: pd.DataFrame, n_each: int = 10) -> pd.DataFrame:
    """The n_each highest and n_each lowest (pooled) risk differences, for a DVC bar plot, with
    the matched contrast's value beside when the report has it."""
    order = df.sort_values(["risk_diff", "layer", "expert"], kind="stable")
    picked = pd.concat([order.tail(n_each), order.head(n_each)])
    picked = picked.drop_duplicates(["layer", "expert"])
    picked = picked.sort_values("risk_diff", ascending=False, kind="stable")
    out = pd.DataFrame(
        {
            "pair": [f"L{r.layer:02d} E{r.expert:03d}" for r in picked.itertuples()],
            "layer": picked["layer"].to_numpy(),
            "expert": picked["expert"].to_numpy(),
            "risk_diff": picked["risk_diff"].to_numpy(),
            "q_perm": picked["q_perm"].to_numpy(),
        }
    )
    matched = f"{MATCHED.prefix}risk_diff"
    if matched in picked.columns:
        out[matched] = picked[matched].to_numpy()
    return out


def heatmap_png(
    df: pd.DataFrame, meta: Mapping[str, str], alpha: float = 0.05, dpi: int = 100
) -> bytes:
    """PNG bytes of layer x expert heatmaps of risk_diff, diverging and centred at 0: one panel
    per contrast with inference in the report (pooled, and matched when present), on one colour
    scale. Pairs with prompt-level q_perm <= alpha are circled. Rendered in memory (no pyplot
    global state) so the stage writes nothing until everything is computed.
    """
    from matplotlib.figure import Figure

    n_layers, n_experts = max(moe_layers_of(meta)) + 1, int(meta[META_N_EXPERTS])
    panels = [c for c in CONTRASTS if c.inferred and f"{c.prefix}risk_diff" in df.columns]
    layer, expert = df["layer"].to_numpy(), df["expert"].to_numpy()
    grids = []
    for c in panels:
        grid = np.full((n_layers, n_experts), np.nan)  # [L, E]; dense layers stay blank
        grid[layer, expert] = df[f"{c.prefix}risk_diff"].to_numpy()
        grids.append(grid)
    lim = max(max(float(np.nanmax(np.abs(g))) for g in grids), 1e-6)
    width = min(3.0 + 0.16 * n_experts, 24.0)
    fig = Figure(
        figsize=(min(width * len(panels), 36.0), min(2.0 + 0.2 * n_layers, 16.0)),
        layout="constrained",
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    info = json.loads(meta.get("contrasts", "{}"))
    for ax, c, grid in zip(axes, panels, grids, strict=True):
        im = ax.imshow(
            grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
        )
        title = c.name
        if c.name in info:
            title += f" ({info[c.name]['prompts_case']} vs {info[c.name]['prompts_reference']})"
        q = df[f"{c.prefix}q_perm"].to_numpy()
        if not np.isnan(q).all():
            hit = q <= alpha
            ax.scatter(expert[hit], layer[hit], s=30, facecolors="none", edgecolors="black",
                       linewidths=0.8)  # fmt: skip
            title += f"\n{int(hit.sum())} circled: q_perm <= {alpha:g}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), label="risk diff (case - reference)")
    fig.suptitle(f"{meta.get(META_MODEL, '')}  scope={meta['token_scope']}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
