"""Bench: multiple-choice scoring with the lower layers computed once (prefix scoring) vs
today's scorer, on the default model (models/base) and TruthfulQA's test items.

Every steering condition edits the output of one decoder layer L (the activations' layer, 20
of 30 by default), so layers 0..L compute the same states for all of them. Baseline:
score_choices under steering_hook, once per condition (all layers each time). New:
compute_prefix once (layers 0..L), then score_prefix per condition (layers L+1.. only, the same
batches). Conditions: the unsteered model and three scales of one seeded random direction
(timing and equality do not depend on the direction). Goal: ratio = baseline seconds / new
seconds >= 2 (new = the prefix plus the tails; per condition the full and the tail run are
timed back to back, their order flipping every condition). Last line: one JSON object (bench
contract: bench, ratio, equal, goal, baseline); equal: every score of every condition agrees
within 1e-4 (bit_identical says whether they are the same floats).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin (see dvc.yaml)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from steerline.mat_steer.activations import resolve_layer  # noqa: E402
from steerline.mat_steer.evaluate import (  # noqa: E402
    compute_prefix,
    mc_items,
    score_choices,
    score_prefix,
    task_items,
)
from steerline.model.load import load_causal_lm  # noqa: E402
from steerline.steering.residual import additive_fn, steering_hook  # noqa: E402

BASE, TRUTHFULQA = Path("models/base"), Path("data/attributes/truthfulqa.parquet")
LAYER_RATIO = 0.6667  # params.yaml extract_activations.layer_ratio: layer 20 of 30
SCALES, NORM = (0.25, 0.5, 1.0), 8.0  # like eval_steering.mean_diff_scales
MAX_ROWS, TOLERANCE = 64, 1e-4  # params.yaml eval_steering.max_rows


def main() -> None:
    for path, stage in ((BASE / "config.json", "build_models"), (TRUTHFULQA, "prepare_attributes")):
        if not path.is_file():
            sys.exit(f"bench/mc_scoring.py: {path} missing (dvc repro {stage})")
    torch.manual_seed(0)
    model, tok = load_causal_lm(BASE, device="cpu")
    layer = resolve_layer(model.config.num_hidden_layers, None, LAYER_RATIO)
    items, _ = mc_items("truthfulqa", task_items(pd.read_parquet(TRUTHFULQA), "test"))
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm() * NORM  # [D]
    conditions = {"base": None, **{f"x{s:g}": additive_fn(s * direction) for s in SCALES}}
    score_choices(model, tok, items[:2], MAX_ROWS)  # warm-up

    t0 = time.perf_counter()
    prefix = compute_prefix(model, tok, items, layer, MAX_ROWS)
    prefix_s = time.perf_counter() - t0
    full: dict[str, list[np.ndarray]] = {}
    cached: dict[str, list[np.ndarray]] = {}
    full_s, tail_s = 0.0, 0.0

    def run_full(name: str, fn) -> float:
        t = time.perf_counter()
        with steering_hook(model, layer, fn):
            full[name] = score_choices(model, tok, items, MAX_ROWS, desc=name)
        return time.perf_counter() - t

    def run_tail(name: str, fn) -> float:
        t = time.perf_counter()
        cached[name] = score_prefix(model, prefix, fn, desc=name)
        return time.perf_counter() - t

    # per condition one full and one tail run, the order flipping every condition, so a slow
    # stretch of the shared machine lands on both methods alike
    for k, (name, fn) in enumerate(conditions.items()):
        if k % 2 == 0:
            full_s += run_full(name, fn)
            tail_s += run_tail(name, fn)
        else:
            tail_s += run_tail(name, fn)
            full_s += run_full(name, fn)
    baseline_s, new_s = full_s, prefix_s + tail_s

    diffs = [float(np.abs(a - b).max()) for name in conditions
             for a, b in zip(full[name], cached[name], strict=True)]
    bit_identical = all(np.array_equal(a, b) for name in conditions
                        for a, b in zip(full[name], cached[name], strict=True))
    max_diff = max(diffs)
    ratio = baseline_s / new_s
    n_choices = sum(len(it.choices) for it in items)
    print(f"{len(items)} TruthfulQA test items ({n_choices} choices), layer {layer} of "
          f"{model.config.num_hidden_layers}, {len(conditions)} conditions")
    print(f"seconds: full forwards, all conditions {baseline_s:.1f}; prefix {prefix_s:.1f} + tails "
          f"{new_s - prefix_s:.1f} = {new_s:.1f}; prefix holds {prefix.nbytes / 1e6:.1f} MB")
    print(f"ratio {ratio:.2f} (goal >= 2); max |diff| {max_diff:.3g}, bit identical "
          f"{bit_identical}")
    print(json.dumps({
        "bench": "mc_scoring", "ratio": round(ratio, 3), "equal": bool(max_diff <= TOLERANCE),
        "goal": "ratio >= 2", "baseline": "full_forward_per_condition",
        "bit_identical": bool(bit_identical), "max_abs_diff": max_diff,
        "baseline_s": round(baseline_s, 2), "new_s": round(new_s, 2),
        "prefix_s": round(prefix_s, 2), "prefix_bytes": prefix.nbytes, "items": len(items),
        "choices": n_choices, "conditions": len(conditions), "layer": layer,
    }))


if __name__ == "__main__":
    main()
