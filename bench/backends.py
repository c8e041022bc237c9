"""Benchmark: generation with routing capture, vLLM vs transformers backend, on the default MoE.

Same prompts (the first --n detect-split safety prompts), same max_new_tokens, greedy; the
answers and routing are compared (steerline.backends.compare): "equal" is the issue's criterion,
identical answers up to splits at a float tie of the next-token logits and >= 99.5% of
token-layers with the same top-k experts.
Also times vLLM generation without any hook (its own routing rule, no capture) to give the
capture overhead. Engine start-up is timed apart; both backends get one torch thread by default
(`--hf-threads` sets the process's count, which vLLM on CPU serves with too). Goal: ratio >= 2.
Last line: one JSON object (bench contract: bench, ratio, equal, goal, baseline).
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import time

import pandas as pd
import torch
from quick import QUICK
from transformers import AutoTokenizer

from steerline.backends import make_backend
from steerline.backends.compare import compare_runs
from steerline.core.chat import render_chat


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/moe")
    ap.add_argument("--n", type=int, default=2 if QUICK else 64)
    ap.add_argument("--max-new-tokens", type=int, default=4 if QUICK else 32)
    ap.add_argument("--hf-batch-size", type=int, default=16)  # capture_routing's default
    # the process's torch threads: transformers' and, on CPU, vLLM's (see VLLMBackend)
    ap.add_argument("--hf-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.hf_threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    df = pd.read_parquet("data/prompts/safety.parquet")
    df = df[df["split"] == "detect"].sort_values("prompt_id").head(args.n)
    chats = [render_chat(tok, t) for t in df["text"]]
    m = args.max_new_tokens

    hf, hf_load = timed(lambda: make_backend("transformers", args.model,
                                             batch_size=args.hf_batch_size))
    ref, t_hf = timed(lambda: hf.generate_and_capture(chats, m))
    vb, vllm_load = timed(lambda: make_backend("vllm", args.model, progress=False))
    print(f"torch threads: transformers {args.hf_threads}, vLLM {torch.get_num_threads()}")
    with vb:
        if not QUICK:  # first-call warm-up (allocations), not timed; only timings need it
            vb.generate(chats[:4], 2)
        got, t_vllm = timed(lambda: vb.generate_and_capture(chats, m))
        vb.routing_rule = "engine"  # no hook at all: vLLM as it comes
        plain, t_plain = timed(lambda: vb.generate(chats, m))

    n_hf = sum(r.n_generated for r in ref)
    n_vllm = sum(r.n_generated for r in got)
    n_plain = sum(len(g.token_ids) for g in plain)
    hf_tps, vllm_tps, plain_tps = n_hf / t_hf, n_vllm / t_vllm, n_plain / t_plain
    c = compare_runs(ref, got, vb.top_k, hf.model)
    print(f"{len(chats)} prompts x {m} new tokens (greedy, with capture)")
    print(f"transformers: {n_hf} tokens in {t_hf:.1f} s = {hf_tps:.1f} tok/s "
          f"(load {hf_load:.1f} s)")
    print(f"vLLM        : {n_vllm} tokens in {t_vllm:.1f} s = {vllm_tps:.1f} tok/s "
          f"(engine start {vllm_load:.1f} s)")
    print(f"vLLM without hooks: {n_plain} tokens in {t_plain:.1f} s = {plain_tps:.1f} tok/s; "
          f"capture overhead {plain_tps / vllm_tps - 1:+.1%}")
    print(f"identical answers: {c.identical}/{len(chats)}, {c.tie_splits} split at a float tie "
          f"of the next-token logits, {c.other_splits} other; top-k agreement "
          f"{c.topk_agreement:.5f} (token-layers of the common prefixes)")
    print(json.dumps({
        "bench": "backends", "ratio": round(vllm_tps / hf_tps, 3), "equal": c.agree,
        "goal": "ratio >= 2", "baseline": "transformers_backend",
        "identical_answers": c.identical, "float_tie_splits": c.tie_splits,
        "other_splits": c.other_splits, "topk_agreement": round(c.topk_agreement, 5),
        "transformers_tok_s": round(hf_tps, 2),
        "vllm_tok_s": round(vllm_tps, 2), "vllm_no_hooks_tok_s": round(plain_tps, 2),
        "capture_overhead": round(plain_tps / vllm_tps - 1, 4), "n_prompts": len(chats),
        "max_new_tokens": m, "vllm_engine_start_s": round(vllm_load, 1), "quick": QUICK,
    }))


if __name__ == "__main__":
    main()
