"""Bench: generation with the MAT-Steer hook vs without, on the default model (models/base).

Greedy generation of a fixed number of new tokens for a batch of chat prompts; unsteered and
steered runs alternate in pairs whose order flips every pair (A B, B A, ...: neither always runs
second), and the ratio is the median over pairs of steered / unsteered (a slow stretch of the
shared machine hits both runs of a pair). Uses the
trained checkpoint models/mat_steer when present, else random steering at the default layer.
Goal: ratio <= 1.10. Last line: one JSON object (bench contract: bench, ratio, equal, goal,
baseline); equal: the steered run with all steering vectors zero gives the unsteered answers.
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin (see dvc.yaml)

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from quick import QUICK  # noqa: E402

from steerline.mat_steer.activations import resolve_layer  # noqa: E402
from steerline.mat_steer.checkpoint import SteeringConfig, load_steering  # noqa: E402
from steerline.mat_steer.generate import generate  # noqa: E402
from steerline.model.load import load_causal_lm  # noqa: E402
from steerline.steering.gated import SteeringModule

BASE, CKPT = Path("models/base"), Path("models/mat_steer")
PROMPTS = ["What happens if you eat watermelon seeds?", "Tell me about your neighbours.",
           "Who is better at math, boys or girls?", "Write a sentence about immigrants.",
           "Is it safe to swim after eating?", "Describe an old man using a phone.",
           "What do you think of people from other countries?", "How do vaccines work?"
           ][: 2 if QUICK else None]
# REPEATS an even number: each order equally often (quick: one pair, unsteered first)
NEW_TOKENS, REPEATS = (4, 1) if QUICK else (32, 6)


def main() -> None:
    if not (BASE / "config.json").is_file():
        sys.exit("bench/steering_overhead.py: models/base missing (dvc repro build_models)")
    torch.manual_seed(0)
    model, tok = load_causal_lm(BASE, device="cpu")
    if (CKPT / "config.json").is_file():
        module, cfg = load_steering(CKPT)
        source = str(CKPT)
    else:
        n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
        module = SteeringModule(d, 3, init_scale=0.05, generator=torch.Generator().manual_seed(0))
        cfg = SteeringConfig(["a", "b", "c"], resolve_layer(n_layers, None, 14 / 32), d, str(BASE))
        source = "random steering"
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    if not QUICK:  # warm-up: only timings need it
        generate(model, tok, PROMPTS[:2], max_new_tokens=4)
    def timed(*steering) -> float:
        t0 = time.perf_counter()
        generate(model, tok, PROMPTS, *steering, **kw)
        return time.perf_counter() - t0

    plain, steered = [], []
    for r in range(REPEATS):
        if r % 2 == 0:
            plain.append(timed())
            steered.append(timed(module, cfg))
        else:
            steered.append(timed(module, cfg))
            plain.append(timed())
    pairs = [b / a for a, b in zip(plain, steered, strict=True)]  # steered / unsteered
    ratio = statistics.median(pairs)
    p, s = statistics.median(plain), statistics.median(steered)
    print(f"{len(PROMPTS)} prompts x {NEW_TOKENS} new tokens, layer {cfg.layer}, {source}")
    print(f"median seconds: unsteered {p:.3f}, steered {s:.3f} ({REPEATS} pairs, order "
          f"alternating); pair ratios {[round(x, 3) for x in pairs]}")
    print(f"steering overhead ratio (median of pairs): {ratio:.3f} (goal <= 1.10)")
    # the hook itself changes nothing when the vectors are zero (module.steer is exact then)
    zero = SteeringModule(module.hidden_size, module.n_attributes)
    with torch.no_grad():
        zero.steering_vectors.zero_()
    equal = generate(model, tok, PROMPTS, zero, cfg, **kw) == generate(model, tok, PROMPTS, **kw)
    print(json.dumps({
        "bench": "steering_overhead", "ratio": round(ratio, 3), "equal": bool(equal),
        "ratio_of_medians": round(s / p, 3),
        "goal": "ratio <= 1.10", "baseline": "unsteered_generation", "steered_s": round(s, 3),
        "unsteered_s": round(p, 3), "repeats": REPEATS, "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS, "layer": cfg.layer, "steering": source, "quick": QUICK,
    }))


if __name__ == "__main__":
    main()
