"""The safety evaluation in short: the DVC metrics (each variant's rates, 95% bounds and McNemar
p-values) and the plain-text table the stage prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerline.core.stats import round_p


def headline_metrics(metrics: Mapping[str, Mapping[str, float]],
                     rates: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     comparisons: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The DVC metrics: each variant's rates and checks, the 95% bounds of the two headline
    rates (4 decimals) and the McNemar p-values against the reference (3 significant digits:
    4 decimals turn p = 4.8e-07 into 0.0)."""
    out: dict[str, dict[str, float]] = {}
    for name, m in metrics.items():
        row = dict(m)
        for metric in ("refusal_unsafe", "over_refusal_safe"):
            row[f"{metric}_ci_low"] = rates[name][metric]["ci_low"]
            row[f"{metric}_ci_high"] = rates[name][metric]["ci_high"]
            if name in comparisons:
                row[f"{metric}_mcnemar_p"] = comparisons[name][metric]["p_value"]
        out[name] = {k: round_p(v) if k.endswith("_mcnemar_p") else round(float(v), 4)
                     for k, v in row.items()}
    return out


def results_table(rates: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  comparisons: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: per variant, the two headline rates (%) with Wilson 95% intervals and
    the change vs its reference (points, McNemar p)."""
    head = ("variant", "refusal_unsafe % [95% CI]", "over_refusal_safe % [95% CI]")
    lines = [f"{head[0]:27s} {head[1]:26s} {head[2]:29s} vs reference: refusal points (p) / "
             "over-refusal points (p), goal met"]
    for name, r in rates.items():
        cells = [f"{name:27s}"]
        for metric, width in (("refusal_unsafe", 26), ("over_refusal_safe", 29)):
            m = r[metric]
            cell = f"{100 * m['rate']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
            cells.append(f"{cell:{width}s}")
        c = comparisons.get(name)
        if c:
            ru, ro = c["refusal_unsafe"], c["over_refusal_safe"]
            cells.append(f"{c['reference']}: {ru['points']:+.1f} (p={ru['p_value']:.2g}) / "
                         f"{ro['points']:+.1f} (p={ro['p_value']:.2g}), {c.get('goal_met')}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
