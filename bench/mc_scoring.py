"""Bench: multiple-choice scoring as eval_baselines / eval_steering run it (choices packed as a
token tree per item, the lower layers computed once: prefix scoring) vs the scorer this goal was
set against (bench/baselines/mc_rows.py: a row per choice on a copy of its prompt's KV cache,
all layers per condition), on the default model (models/base) and TruthfulQA's test items.

Every steering condition edits the output of one decoder layer L (the activations' layer, 20
of 30 by default), so layers 0..L compute the same states for all of them. Baseline:
score_choices_rows under steering_hook, once per condition. New: compute_prefix once (layers
0..L), then score_prefix per condition (layers L+1.. only). Beside them, packed_full_s: the
packed scorer (score_choices) per condition with all layers, which splits the gain into its
two parts. Conditions: the unsteered model and three scales of one seeded random direction
(timing and equality do not depend on the direction). Goal: ratio = baseline seconds / new
seconds >= 2 (new = the prefix plus the tails; per condition the three runs are timed back to
back, their order rotating every condition). Last line: one JSON object (bench contract: bench,
ratio, equal, goal, baseline); equal: every score of every condition agrees within 1e-4
(bit_identical says whether they are the same floats; the packed full forward and the prefix
path are compared bit for bit in tests/test_prefix_scoring.py).
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin (see dvc.yaml)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from baselines.mc_rows import score_choices_rows  # noqa: E402
from quick import QUICK  # noqa: E402

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
QUICK_ITEMS = 2  # quick mode: the items with fewest choices, unsteered and one steered condition


def main() -> None:
    for path, stage in ((BASE / "config.json", "build_models"), (TRUTHFULQA, "prepare_attributes")):
        if not path.is_file():
            sys.exit(f"bench/mc_scoring.py: {path} missing (dvc repro {stage})")
    torch.manual_seed(0)
    model, tok = load_causal_lm(BASE, device="cpu")
    layer = resolve_layer(model.config.num_hidden_layers, None, LAYER_RATIO)
    items, _ = mc_items("truthfulqa", task_items(pd.read_parquet(TRUTHFULQA), "test"))
    if QUICK:
        items = sorted(items, key=lambda it: len(it.choices))[:QUICK_ITEMS]
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm() * NORM  # [D]
    scales = SCALES[-1:] if QUICK else SCALES
    conditions = {"base": None, **{f"x{s:g}": additive_fn(s * direction) for s in scales}}
    if not QUICK:  # warm-up: only timings need it
        score_choices_rows(model, tok, items[:2], MAX_ROWS)
        score_choices(model, tok, items[:2], MAX_ROWS)

    t0 = time.perf_counter()
    prefix = compute_prefix(model, tok, items, layer, MAX_ROWS)
    prefix_s = time.perf_counter() - t0
    full: dict[str, list[np.ndarray]] = {}
    packed: dict[str, list[np.ndarray]] = {}
    cached: dict[str, list[np.ndarray]] = {}
    seconds = {"full": 0.0, "packed": 0.0, "tail": 0.0}

    def run_full(name: str, fn) -> None:
        with steering_hook(model, layer, fn):
            full[name] = score_choices_rows(model, tok, items, MAX_ROWS)

    def run_packed(name: str, fn) -> None:
        with steering_hook(model, layer, fn):
            packed[name] = score_choices(model, tok, items, MAX_ROWS, desc=name)

    def run_tail(name: str, fn) -> None:
        cached[name] = score_prefix(model, prefix, fn, desc=name)

    runs = [("full", run_full), ("packed", run_packed), ("tail", run_tail)]
    # per condition the three runs back to back, the order rotating every condition, so a slow
    # stretch of the shared machine lands on every method alike
    for k, (name, fn) in enumerate(conditions.items()):
        for key, run in runs[k % 3:] + runs[:k % 3]:
            t = time.perf_counter()
            run(name, fn)
            seconds[key] += time.perf_counter() - t
    baseline_s, new_s = seconds["full"], prefix_s + seconds["tail"]

    diffs = [float(np.abs(a - b).max()) for name in conditions
             for a, b in zip(full[name], cached[name], strict=True)]
    bit_identical = all(np.array_equal(a, b) for name in conditions
                        for a, b in zip(full[name], cached[name], strict=True))
    max_diff = max(diffs)
    ratio = baseline_s / new_s
    n_choices = sum(len(it.choices) for it in items)
    print(f"{len(items)} TruthfulQA test items ({n_choices} choices), layer {layer} of "
          f"{model.config.num_hidden_layers}, {len(conditions)} conditions")
    print(f"seconds: row-per-choice full forwards, all conditions {baseline_s:.1f}; packed full "
          f"forwards {seconds['packed']:.1f}; prefix {prefix_s:.1f} + tails "
          f"{new_s - prefix_s:.1f} = {new_s:.1f}; prefix holds {prefix.nbytes / 1e6:.1f} MB")
    packed_equal = all(np.array_equal(a, b) for name in conditions
                       for a, b in zip(packed[name], cached[name], strict=True))
    print(f"ratio {ratio:.2f} (goal >= 2); max |diff| {max_diff:.3g}, bit identical "
          f"{bit_identical}")
    print(json.dumps({
        "bench": "mc_scoring", "ratio": round(ratio, 3), "equal": bool(max_diff <= TOLERANCE),
        "goal": "ratio >= 2", "baseline": "kv_cache_rows_full_forward_per_condition",
        "bit_identical": bool(bit_identical), "max_abs_diff": max_diff,
        "baseline_s": round(baseline_s, 2), "new_s": round(new_s, 2),
        "prefix_s": round(prefix_s, 2), "packed_full_s": round(seconds["packed"], 2),
        "packed_ratio": round(baseline_s / seconds["packed"], 3),
        "prefix_equals_packed_full": bool(packed_equal), "prefix_bytes": prefix.nbytes,
        "items": len(items),
        "choices": n_choices, "conditions": len(conditions), "layer": layer, "quick": QUICK,
    }))


if __name__ == "__main__":
    main()
