"""What eval_steering reports: gate quality on test (with the linear-probe ceiling), gate
histograms for `dvc plots`, and paired comparisons of the steering conditions over items."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from steerline.core.stats import paired_bootstrap
from steerline.mat_steer.activations import PosNeg
from steerline.mat_steer.diagnostics import attribute_diagnostics
from steerline.mat_steer.evaluate import metric_task
from steerline.mat_steer.losses import Bandwidth
from steerline.mat_steer.probe import fit_probe, probe_auroc
from steerline.steering.gated import SteeringModule

HIST_BINS = 20  # gate histogram bins of width 0.05 on [0, 1]


def gate_report(module: SteeringModule, attributes: Sequence[str], train: Mapping[str, PosNeg],
                dev: Mapping[str, PosNeg], test: Mapping[str, PosNeg], bandwidth: Bandwidth,
                probe_cs: Sequence[float], probe_scale: float) -> dict[str, dict[str, float]]:
    """Per attribute: the gate's diagnostics on test and an L2 logistic probe's test AUROC (fit on
    train, C chosen on dev): the linear ceiling a gate can reach on these activations."""
    out = {}
    for t, name in enumerate(attributes):
        diag = attribute_diagnostics(module, t, test[name].pos, test[name].neg, bandwidth)
        probe = fit_probe(train[name].pos, train[name].neg, dev[name].pos, dev[name].neg,
                          probe_cs, probe_scale)
        diag["probe_auroc"] = probe_auroc(probe, test[name].pos, test[name].neg)
        diag["probe_C"] = probe.C
        diag["gate_minus_probe_auroc"] = diag["gate_auroc"] - diag["probe_auroc"]
        out[name] = diag
    return out


GATE_GOALS = {"auroc_min": 0.75, "probe_gap_max": 0.05, "median_neg_min": 0.5,
              "median_pos_max": 0.2}


def gate_goal_failures(diag: Mapping[str, float], goals: Mapping[str, float] = GATE_GOALS
                       ) -> list[str]:
    """The gate goals one attribute's test diagnostics miss (empty: all met): AUROC, gap to the
    probe (when a probe AUROC is present), median gate on negatives / positives, MMD falls."""
    failed = []
    if not diag["gate_auroc"] >= goals["auroc_min"]:
        failed.append(f"gate AUROC {diag['gate_auroc']:.3f} < {goals['auroc_min']}")
    if "probe_auroc" in diag and not diag["gate_auroc"] >= diag["probe_auroc"] - goals[
            "probe_gap_max"]:
        failed.append(f"gate AUROC {diag['gate_auroc']:.3f} more than {goals['probe_gap_max']} "
                      f"below the probe's {diag['probe_auroc']:.3f}")
    if not diag["gate_median_neg"] >= goals["median_neg_min"]:
        failed.append(f"median gate on negatives {diag['gate_median_neg']:.3f} < "
                      f"{goals['median_neg_min']}")
    if not diag["gate_median_pos"] <= goals["median_pos_max"]:
        failed.append(f"median gate on positives {diag['gate_median_pos']:.3f} > "
                      f"{goals['median_pos_max']}")
    if not diag["mmd_after"] < diag["mmd_before"]:
        failed.append(f"MMD after steering {diag['mmd_after']:.4g} >= before "
                      f"{diag['mmd_before']:.4g}")
    return failed


@torch.no_grad()
def gate_histograms(module: SteeringModule, attributes: Sequence[str],
                    test: Mapping[str, PosNeg]) -> list[dict[str, float]]:
    """Rows for a `dvc plots` CSV: per gate bin (its centre), the fraction of each attribute's test
    positives / negatives whose own gate falls in the bin (columns `<attribute>_pos` / `_neg`)."""
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    rows = [{"gate": round(float((lo + hi) / 2), 4)} for lo, hi in zip(edges[:-1], edges[1:],
                                                                       strict=True)]
    for t, name in enumerate(attributes):
        for label, acts in (("pos", test[name].pos), ("neg", test[name].neg)):
            g = module.gates(acts)[:, t].double().numpy()  # [N]
            counts, _ = np.histogram(g, bins=edges)
            for row, c in zip(rows, counts, strict=True):
                row[f"{name}_{label}"] = round(float(c) / len(g), 6)
    return rows


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int, seed: int
            ) -> dict[str, dict[str, float]]:
    """Paired bootstrap of condition a minus condition b on the same items, per metric and for
    the average over the metrics."""
    per_item = {m: (a[m], b[m]) for m in a}
    return paired_bootstrap(per_item, {m: metric_task(m) for m in a}, n_boot, seed)


def verdict(ci: Mapping[str, float]) -> str:
    """'costs' / 'helps' when the 95% CI excludes 0, else 'no significant difference'."""
    if ci["hi"] < 0:
        return "costs"
    if ci["lo"] > 0:
        return "helps"
    return "no significant difference"
