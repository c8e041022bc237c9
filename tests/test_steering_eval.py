"""The dev scale pick of eval_baselines / eval_steering: best dev average, and a pick at the
grid's edge extends the grid (x2 above, half below) up to `extend` points per side."""

from __future__ import annotations

import numpy as np
import pytest

from steerline.pipeline.steering_eval import Scorer


def scorer_for(curve) -> tuple[Scorer, list[float]]:
    """A Scorer whose dev run at scale s gives every metric the value curve(s)."""
    scorer = Scorer(model=None, tokenizer=None, layer=0, max_rows=1, items={})
    runs: list[float] = []

    def run(name, split, fn):
        runs.append(fn)
        return {"m": np.array([curve(fn)])}

    scorer.run = run  # type: ignore[method-assign]
    return scorer, runs


@pytest.mark.parametrize(("curve", "extend", "want", "edge", "ran"), [
    (lambda s: s, 0, 4.0, "top", [1, 2, 4]),  # rising, no extension: the edge is reported
    (lambda s: s, 2, 16.0, "top", [1, 2, 4, 8, 16]),  # still rising after 2: still at the edge
    (lambda s: -abs(s - 8), 2, 8.0, None, [1, 2, 4, 8, 16]),  # the peak is found inside
    (lambda s: -s, 1, 0.5, "bottom", [1, 2, 4, 0.5]),  # falling: extends downward
    (lambda s: -abs(s - 2), 2, 2.0, None, [1, 2, 4]),  # inside the grid: nothing added
])
def test_pick_extends_a_grid_whose_best_is_at_its_edge(curve, extend, want, edge, ran):
    scorer, runs = scorer_for(curve)
    best, sweep, at_edge = scorer.pick("x", [1.0, 2.0, 4.0], lambda s: s, extend)
    assert (best, at_edge) == (want, edge)
    assert runs == ran  # each scale scored once
    assert list(sweep) == [f"{s:g}" for s in ran]


def test_one_scale_means_no_dev_run():
    scorer, runs = scorer_for(lambda s: s)
    assert scorer.pick("x", [3.0], lambda s: s, 2) == (3.0, {}, None) and runs == []
