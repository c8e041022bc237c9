"""Bench: `steerline serve` throughput, steered vs unsteered, at a fixed concurrency.

One server (steerline.serve.server.Server on a free loopback port) on the default MoE
(models/moe); CONCURRENCY clients of the official `openai` client send the same chat prompts at
once, unsteered or all steered by expert_steering's plan (params.yaml mode / n_experts / delta
over models/experts.json, the plan the pipeline's `steered` variant uses; MAT-Steer's hook cost
is bench/steering_overhead.py's, and its checkpoint is trained on models/base). Runs alternate
in pairs whose order flips every pair; each run's figure is generated tokens per second (steered
answers may differ in length), and the ratio is the median over pairs of unsteered / steered
throughput. Goal: ratio <= 1.10 (steering costs at most 10% throughput). `equal`: the mixed run
(every other request steered) gives each request the answer it gets alone. Last line: one JSON
object (bench contract).
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
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402
from quick import QUICK  # noqa: E402

from steerline.serve.artifacts import ExpertDefaults  # noqa: E402
from steerline.serve.server import ServeConfig, Server  # noqa: E402

MODEL, EXPERTS = Path("models/moe"), Path("models/experts.json")
PROMPTS = ["How do I pick a lock?", "What is the capital of France?", "Write a haiku about rain.",
           "How can I steal a car?", "Give me three tips for sleeping better.",
           "Explain photosynthesis in one sentence.", "How do I make a bomb?", "Say hello."]
# REPEATS an even number: each order equally often (quick: one pair, unsteered first)
CONCURRENCY, NEW_TOKENS, REPEATS = (4, 8, 1) if QUICK else (8, 32, 6)


def main() -> None:
    if not (MODEL / "config.json").is_file() or not EXPERTS.is_file():
        sys.exit("bench/serve.py: models/moe or models/experts.json missing "
                 "(dvc repro select_experts)")
    p = yaml.safe_load(Path("params.yaml").read_text())["expert_steering"]
    steering = {"experts": {"mode": p["mode"], "n": p["n_experts"], "delta": p["delta"]}}
    cfg = ServeConfig(str(MODEL), name="moe", experts=str(EXPERTS), port=0,
                      defaults=ExpertDefaults(), vllm_options={"max_num_seqs": CONCURRENCY})
    t0 = time.perf_counter()
    with Server(cfg).start() as srv:
        start_s = time.perf_counter() - t0
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused",
                               max_retries=0, timeout=600)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CONCURRENCY)]

        def ask(prompt: str, steered: bool) -> tuple[str, int]:
            extra = {"extra_body": {"steering": steering}} if steered else {}
            r = client.chat.completions.create(
                model="moe", messages=[{"role": "user", "content": prompt}],
                max_tokens=NEW_TOKENS, temperature=0, **extra)
            return r.choices[0].message.content, r.usage.completion_tokens

        def run(flags: list[bool]) -> tuple[list[str], float]:
            """Answers and generated tokens per second of CONCURRENCY requests at once."""
            t = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                got = list(pool.map(ask, prompts, flags))
            return [a for a, _ in got], sum(n for _, n in got) / (time.perf_counter() - t)

        run([False] * CONCURRENCY)  # warm-up
        plain, steered = [], []
        for r in range(REPEATS):
            for which in ((False, True) if r % 2 == 0 else (True, False)):
                (steered if which else plain).append(run([which] * CONCURRENCY)[1])
        mixed = [i % 2 == 1 for i in range(CONCURRENCY)]
        together, _ = run(mixed)
        alone = [ask(q, s)[0] for q, s in zip(prompts, mixed, strict=True)]
    pairs = [a / b for a, b in zip(plain, steered, strict=True)]  # unsteered / steered tok/s
    ratio = statistics.median(pairs)
    print(f"{CONCURRENCY} concurrent chat requests x {NEW_TOKENS} new tokens on {MODEL}; "
          f"steering {json.dumps(steering)}; server start {start_s:.1f} s")
    print(f"median tokens/s: unsteered {statistics.median(plain):.1f}, steered "
          f"{statistics.median(steered):.1f} ({REPEATS} pairs, order alternating); pair ratios "
          f"{[round(x, 3) for x in pairs]}")
    print(f"throughput cost of steering (median unsteered / steered): {ratio:.3f} "
          "(goal <= 1.10)")
    print(json.dumps({
        "bench": "serve", "ratio": round(ratio, 3), "equal": together == alone,
        "goal": "ratio <= 1.10", "baseline": "unsteered_serving",
        "unsteered_tok_s": round(statistics.median(plain), 2),
        "steered_tok_s": round(statistics.median(steered), 2), "concurrency": CONCURRENCY,
        "new_tokens": NEW_TOKENS, "repeats": REPEATS, "start_s": round(start_s, 1),
        "steering": steering, "quick": QUICK,
    }))


if __name__ == "__main__":
    main()
