"""eval_steering's report pieces: paired bootstrap, probe ceiling, gate histograms, goals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerline.core.stats import paired_bootstrap
from steerline.mat_steer.activations import PosNeg
from steerline.mat_steer.probe import fit_probe, probe_auroc
from steerline.mat_steer.report import compare, gate_goal_failures, gate_histograms, verdict
from steerline.steering.gated import SteeringModule


def test_paired_bootstrap_exact_cases() -> None:
    a = np.array([1.0, 0.0, 1.0, 1.0])
    same = paired_bootstrap({"m": (a, a)}, {"m": "t"}, 200, 0)
    assert same["m"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    shifted = paired_bootstrap({"m": (a + 0.25, a)}, {"m": "t"}, 200, 0)
    assert shifted["m"]["diff"] == pytest.approx(0.25)
    assert shifted["m"]["lo"] == pytest.approx(0.25) and shifted["m"]["hi"] == pytest.approx(0.25)


def test_paired_bootstrap_average_and_pairing() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(300)
    better = base + 0.1 + rng.normal(0, 0.01, 300)  # paired: small noise around +0.1
    other = rng.random(50)
    out = compare({"truthfulqa_mc1": better, "truthfulqa_mc2": better, "bbq_acc": other,
                   "toxigen_acc": other},
                  {"truthfulqa_mc1": base, "truthfulqa_mc2": base, "bbq_acc": other,
                   "toxigen_acc": other}, 500, 1)
    assert out["truthfulqa_mc1"]["lo"] > 0.09 and out["truthfulqa_mc1"]["hi"] < 0.11
    assert out["average"]["diff"] == pytest.approx(np.mean(better - base) / 2)
    assert out["average"]["lo"] <= out["average"]["diff"] <= out["average"]["hi"]
    assert verdict(out["truthfulqa_mc1"]) == "helps" and verdict(out["bbq_acc"]) != "helps"
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_bootstrap({"m": (base, base[:-1])}, {"m": "t"}, 10, 0)


def test_probe_picks_c_on_dev_and_separates() -> None:
    g = torch.Generator().manual_seed(0)
    d = 8
    shift = torch.zeros(d)
    shift[0] = 2.0

    def draw(n):
        return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + shift

    (tp, tn), (dp, dn), (sp, sn) = draw(100), draw(50), draw(50)
    probe = fit_probe(tp, tn, dp, dn, [0.01, 1.0], scale=3.0)
    assert probe.C in (0.01, 1.0) and probe.dev_auroc > 0.8
    assert probe_auroc(probe, sp, sn) > 0.8
    assert float(probe.weight[0]) > 0  # negatives (shifted) score higher
    with pytest.raises(ValueError, match="non-empty list of positives"):
        fit_probe(tp, tn, dp, dn, [], 1.0)


def test_gate_histograms_are_fractions_per_label() -> None:
    module = SteeringModule(4, 2, generator=torch.Generator().manual_seed(0))
    test = {"x": PosNeg(torch.randn(7, 4), torch.randn(5, 4)),
            "y": PosNeg(torch.randn(3, 4), torch.randn(9, 4))}
    rows = gate_histograms(module, ["x", "y"], test)
    assert len(rows) == 20 and rows[0]["gate"] == 0.025
    for col in ("x_pos", "x_neg", "y_pos", "y_neg"):
        assert sum(r[col] for r in rows) == pytest.approx(1.0, abs=1e-5)


def test_gate_goal_failures() -> None:
    good = {"gate_auroc": 0.8, "probe_auroc": 0.82, "gate_median_neg": 0.6,
            "gate_median_pos": 0.1, "mmd_before": 0.2, "mmd_after": 0.1}
    assert gate_goal_failures(good) == []
    bad = {**good, "gate_auroc": 0.7, "gate_median_pos": 0.3, "mmd_after": 0.3}
    failed = gate_goal_failures(bad)
    assert len(failed) == 4 and any("probe" in f for f in failed)
