"""Benchmark: vectorized streaming risk_diff counts vs two baselines, named for what they are:
`numpy_add_at` (NumPy's unbuffered scatter-add into [2, L, E] counts, the obvious vectorized
way) and `python_loop` (a literal per-token loop, the reference for exactness).

Synthetic routing (default 200k tokens, 30 layers, top-8 of 64 experts) is written as Parquet
shards to a temp dir. The loop runs on all of it by default (--loop-tokens times it on a
subsample instead); every ratio compares methods on the same tokens, counting the same scope
('user'), speedup = baseline time / vectorized time:
- ratio (the contract's, baseline numpy_add_at_kernel): vs np.add.at, counting only, both from
  the same decoded Arrow batches; the vectorized path also keeps per-prompt counts (what the
  permutation null and the bootstrap need), np.add.at only the two label totals;
- ratio_end_to_end_vs_numpy_add_at: the same from the Parquet files, both paying the manifest
  check (SHA-256 of every shard) and the decode, which dilute the kernel's gain;
- ratio_vs_python_loop / ratio_kernel_vs_python_loop: vs the loop, end to end and kernels only.
Results are checked equal (counts, token totals, rates, risk_diff) for all three. The vectorized
time on the full set and the permutation null's time are reported beside. The last line is one
JSON object (bench contract: bench, ratio, equal, goal, baseline).

Goals (measured on the 2-core CPU this project targets, with other jobs running):
- vs np.add.at, kernels: measured 2.7x (np.add.at pays an unbuffered scatter per value; the
  vectorized path bincounts each prompt's run of narrow int16 column indices, cache-resident);
  goal >= 1.5 leaves margin for a loaded machine. A good vectorized implementation should beat
  np.add.at, not merely match it, and this is the comparison that says whether it does.
- vs the Python loop: measured ~12x end to end, ~15x kernels. The earlier goal of 100x is not
  reachable and is retired: end to end, both pay the Parquet decode and the loop's time is mostly
  building Python rows; kernels only, a loop step costs ~30-50 ns per value against ~3-5 ns for
  a bincount, so ~10-20x is the honest range. Reported, not a contract goal.
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from quick import QUICK

from steerline.core.io import write_table
from steerline.steermoe.data.contrasts import POOLED
from steerline.steermoe.detection.counts import count_batches, count_routing
from steerline.steermoe.detection.inference import permutation_null
from steerline.steermoe.detection.table import contrast_columns, risk_diff_table
from steerline.steermoe.routing.manifest import write_routing_manifest
from steerline.steermoe.routing.reader import iter_routing_shard_batches, read_routing_meta
from steerline.steermoe.routing.schema import routing_metadata, routing_table

TOKENS_PER_PROMPT = 100  # 3 template + 60 user + 1 template + 36 generated


def synthetic(n_tokens: int, n_layers: int, top_k: int, n_experts: int, seed: int) -> dict:
    """Per-token arrays; distinct top-k per (token, layer) from a bank of random permutations."""
    rng = np.random.default_rng(seed)
    n_prompts = -(-n_tokens // TOKENS_PER_PROMPT)
    pos = np.tile(np.arange(TOKENS_PER_PROMPT), n_prompts)[:n_tokens]
    prompt = np.repeat(np.arange(n_prompts), TOKENS_PER_PROMPT)[:n_tokens]
    bank = np.argsort(rng.random((4096, n_experts)), axis=1)[:, :top_k].astype(np.int16)
    experts = bank[rng.integers(0, len(bank), (n_tokens, n_layers))]  # [N, L, k]
    return {
        "prompt_id": np.char.add("p", prompt.astype(str)),
        "label": np.where(prompt % 2 == 1, "unsafe", "safe"),
        "position": pos,
        "token_id": rng.integers(0, 49152, n_tokens),
        "is_generated": pos >= 64,
        "is_template": (pos < 3) | (pos == 63),
        "experts": experts.reshape(n_tokens, n_layers * top_k),
        "weights": np.full((n_tokens, n_layers * top_k), 1.0 / top_k, np.float16),
    }


def write(root: Path, arrays: dict, n_rows: int, shard_rows: int, meta: dict) -> Path:
    root.mkdir(parents=True)
    for start in range(0, n_rows, shard_rows):
        part = {k: v[start : min(start + shard_rows, n_rows)] for k, v in arrays.items()}
        write_table(routing_table(**part), root / f"{start:09d}.parquet", meta)
    write_routing_manifest(root)  # a finished capture publishes its manifest last
    return root


COLUMNS = ["prompt_id", "label", "is_generated", "is_template", "experts"]  # what both read


def read_rows(root: Path) -> list[dict]:
    """Decode the shards to Python rows (the loop's input), same columns as the vectorized."""
    return [
        row
        for shard in sorted(root.glob("*.parquet"))
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=16384, columns=COLUMNS)
        for row in batch.to_pylist()
    ]


def loop_counts(rows: list[dict], n_layers: int, top_k: int, n_experts: int) -> tuple:
    """The literal reference: per token, per layer, per slot, in plain Python (scope 'user')."""
    a = [[[0] * n_experts for _ in range(n_layers)] for _ in range(2)]
    n = [0, 0]
    for row in rows:
        if row["is_generated"] or row["is_template"]:
            continue
        lab = 1 if row["label"] == "unsafe" else 0
        n[lab] += 1
        ex = row["experts"]
        for layer in range(n_layers):
            counts = a[lab][layer]
            for e in ex[layer * top_k : (layer + 1) * top_k]:
                counts[e] += 1
    return a, n


def numpy_add_at_counts(batches: list, n_layers: int, top_k: int, n_experts: int) -> tuple:
    """The NumPy baseline: per decoded Arrow batch, mask scope 'user', then np.add.at into
    [2, L, E] counts indexed by (label, layer, expert)."""
    a = np.zeros((2, n_layers, n_experts), np.int64)
    n = np.zeros(2, np.int64)
    layer = np.repeat(np.arange(n_layers), top_k)  # [L*k]
    for _, batch in batches:
        gen = batch.column("is_generated").to_numpy(zero_copy_only=False)
        tmpl = batch.column("is_template").to_numpy(zero_copy_only=False)
        keep = ~(gen | tmpl)
        lab = (batch.column("label").to_numpy(zero_copy_only=False) == "unsafe").astype(np.int64)
        ex = batch.column("experts").flatten().to_numpy().reshape(batch.num_rows, -1)  # [N, L*k]
        lab, ex = lab[keep], ex[keep]
        n += np.bincount(lab, minlength=2)
        np.add.at(a, (lab[:, None], layer[None, :], ex), 1)
    return a, n


def read_batches(root: Path) -> list:
    return list(iter_routing_shard_batches(root, COLUMNS))


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def same(df, ref: tuple, n_layers: int, n_experts: int) -> bool:
    a, n = np.asarray(ref[0]).reshape(2, n_layers * n_experts), ref[1]
    return bool(
        np.array_equal(df["a_safe"], a[0])
        and np.array_equal(df["a_unsafe"], a[1])
        and (df["n_safe"] == n[0]).all()
        and (df["n_unsafe"] == n[1]).all()
        and np.array_equal(df["a_safe_n"], a[0] / n[0])
        and np.array_equal(df["a_unsafe_n"], a[1] / n[1])
        and np.array_equal(df["risk_diff"], a[1] / n[1] - a[0] / n[0])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000 if QUICK else 200_000)
    ap.add_argument(
        "--loop-tokens", type=int, default=None, help="time the loop on a subsample (default: all)"
    )
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--permutations", type=int, default=100 if QUICK else 1000)
    ap.add_argument("--repeats", type=int, default=1 if QUICK else 2,
                    help="best of this many runs, both methods")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    L, K, E = args.layers, args.top_k, args.experts
    sub_tokens = min(args.loop_tokens or args.tokens, args.tokens)
    r = args.repeats

    arrays = synthetic(args.tokens, L, K, E, args.seed)
    meta = routing_metadata(L, K, E, "synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        full = write(Path(tmp) / "full", arrays, args.tokens, 6400, meta)
        sub = (
            full
            if sub_tokens == args.tokens
            else write(Path(tmp) / "sub", arrays, sub_tokens, 6400, meta)
        )
        rmeta = read_routing_meta(sub)

        # end to end: all start from the same Parquet files, read the same columns and check the
        # manifest (count_routing does; read_routing_meta is the same check for the baselines)
        loop_s, ref = best_of(
            lambda: (read_routing_meta(sub), loop_counts(read_rows(sub), L, K, E))[1], r
        )
        vec_s, df_sub = best_of(lambda: risk_diff_table(count_routing(sub, "user")), r)
        # kernels only: both start from data already decoded in memory (rows / Arrow batches)
        rows, batches = read_rows(sub), read_batches(sub)
        loop_k_s, ref_k = best_of(lambda: loop_counts(rows, L, K, E), r)
        np_s, ref_np = best_of(
            lambda: (read_routing_meta(sub), numpy_add_at_counts(read_batches(sub), L, K, E))[1], r
        )
        np_k_s, ref_np_k = best_of(lambda: numpy_add_at_counts(batches, L, K, E), r)
        vec_k_s, df_k = best_of(
            lambda: risk_diff_table(count_batches(batches, rmeta, "user", "memory")), r
        )
        vec_full_s, df_full = best_of(lambda: risk_diff_table(count_routing(full, "user")), r)
        counts = count_routing(full, "user")
        perm_s, _ = best_of(lambda: permutation_null(counts, args.permutations, args.seed), 1)
        # one contrast's prompt-level inference as the stage runs it: per-pair permutation
        # p-values (with the null) and a bootstrap CI, args.permutations draws each
        sides = counts.unsafe.astype(np.int8)
        infer_s, _ = best_of(
            lambda: contrast_columns(
                counts, POOLED, sides, args.permutations, args.permutations, 0.95, args.seed
            ),
            1,
        )

    equal = (same(df_sub, ref, L, E) and same(df_k, ref_k, L, E)
             and same(df_sub, ref_np, L, E) and same(df_k, ref_np_k, L, E))
    in_scope_full = int(df_full["n_safe"].iloc[0] + df_full["n_unsafe"].iloc[0])
    print(
        f"{sub_tokens} tokens, end to end from Parquet: loop {loop_s:.3f} s, "
        f"vectorized {vec_s:.4f} s, ratio {loop_s / vec_s:.1f}"
    )
    print(
        f"{sub_tokens} tokens, counting kernels only:   loop {loop_k_s:.3f} s, "
        f"vectorized {vec_k_s:.4f} s, ratio {loop_k_s / vec_k_s:.1f}"
    )
    print(
        f"{sub_tokens} tokens, vs np.add.at: end to end {np_s:.4f} s (ratio {np_s / vec_s:.1f}), "
        f"kernels only {np_k_s:.4f} s (ratio {np_k_s / vec_k_s:.1f})"
    )
    print(
        f"full {args.tokens} tokens ({in_scope_full} in scope 'user'), vectorized end to end: "
        f"{vec_full_s:.3f} s; permutation null x{args.permutations}: {perm_s:.3f} s; "
        f"prompt-level inference (p-values + bootstrap CI, x{args.permutations} each): "
        f"{infer_s:.3f} s per contrast"
    )
    result = {
        "bench": "risk_diff",
        "ratio": round(np_k_s / vec_k_s, 2),
        "equal": equal,
        "goal": "ratio >= 1.5",  # see the module docstring: measured ~2.7 on the loaded 2 cores
        "baseline": "numpy_add_at_kernel",
        "ratio_end_to_end_vs_numpy_add_at": round(np_s / vec_s, 2),
        "ratio_vs_python_loop": round(loop_s / vec_s, 1),
        "ratio_kernel_vs_python_loop": round(loop_k_s / vec_k_s, 1),
        "numpy_add_at_s": round(np_s, 4),
        "numpy_add_at_kernel_s": round(np_k_s, 4),
        "tokens_compared": sub_tokens,
        "loop_s": round(loop_s, 4),
        "vectorized_s": round(vec_s, 4),
        "loop_kernel_s": round(loop_k_s, 4),
        "vectorized_kernel_s": round(vec_k_s, 4),
        "tokens_full": args.tokens,
        "in_scope_tokens_full": in_scope_full,
        "vectorized_s_full": round(vec_full_s, 4),
        "vectorized_tokens_per_s_full": round(args.tokens / vec_full_s),
        "permutations": args.permutations,
        "permutation_null_s_full": round(perm_s, 4),
        "prompt_inference_s_full": round(infer_s, 4),
        "layers": L,
        "top_k": K,
        "n_experts": E,
        "repeats": r,
        "quick": QUICK,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
