"""Benchmark: sequential permutation p-values (risk_diff.p_method: sequential) against the fixed
1,000 shuffles (p_method: fixed, the earlier default), on the default model's routing.

Problems: the contrasts with inference (pooled, matched) of data/routing's per-prompt counts,
token scope user, as the risk_diff stage forms them (needs `dvc repro capture_routing
prepare_safety`); without them, a synthetic problem of the same shape (359 prompts, 480
columns, a third of the columns with a planted difference). Per contrast, both methods draw the
same first --permutations shuffles (seed as the stage's: [seed, contrast, 0]); the sequential
one draws on for the columns with fewer than --stop exceedances among them, up to --cap.

ratio = the prompt-level inference of all contrasts (permutation p-values + bootstrap CI with
--bootstrap resamples, what the stage computes per contrast beside counting) with sequential
p-values / with fixed ones, best of --repeats, run alternately; goal <= 3 at params.yaml's cap
20,000 (measured ~2 on the loaded 2 cores; ~1.5 at 10,000 and ~8 at 100,000: the cost grows as
cap x the columns left unresolved, docs/risk_diff_pvalues.md). Reported beside:
the permutation part alone, per contrast the columns that drew beyond the fixed shuffles, the
most draws, the pairs with q <= 0.05 by each method. equal: the sequential run's null (max
|risk_diff| per shuffle) and the p-values of the columns it kept at the fixed draws are the
fixed run's, and its result is the same at another chunk size.
The last line is one JSON object (tools.bench_contract).
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import time
from pathlib import Path

import numpy as np
from quick import QUICK

from steerline.steermoe.data.contrasts import (
    CONTRASTS,
    contrast_sides,
    needs_sources,
    prompt_sources,
    sources_present,
)
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.detection.counts import count_routing
from steerline.steermoe.detection.inference import (
    SequentialStop,
    bh_qvalues,
    bootstrap_ci,
    permutation_test,
    sequential_permutation_test,
)

ROOT = Path(__file__).resolve().parents[1]
ROUTING, PROMPTS = ROOT / "data" / "routing", ROOT / "data" / "prompts" / "safety.parquet"
# (name, contrast index, counts [P_all, C], tokens [P], case [P], rows [P] or None)
Problem = tuple[str, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def routed_problems() -> list[Problem]:
    """The stage's contrasts with inference on data/routing (as compute_risk_diff forms them)."""
    counts = count_routing(ROUTING, "user")
    table = read_safety_prompts(PROMPTS)
    source = prompt_sources(counts.prompt_ids, counts.unsafe,
                            table[["prompt_id", "label", "source"]], str(PROMPTS))
    out = []
    for index, contrast in enumerate(CONTRASTS):
        if not contrast.inferred or (needs_sources(contrast)
                                     and not sources_present(contrast, source)):
            continue
        sides = contrast_sides(contrast, source, counts.unsafe)
        keep = sides >= 0
        rows = None if keep.all() else np.flatnonzero(keep)
        out.append((contrast.name, index, counts.counts, counts.tokens[keep], sides[keep] == 1,
                    rows))
    return out


def synthetic_problem(n_prompts: int, n_cols: int, seed: int) -> list[Problem]:
    """One contrast: column c routes a case prompt's tokens at 0.3 + effect_c (0 for two thirds
    of the columns, up to 0.15 for the rest), 4..15 tokens a prompt."""
    rng = np.random.default_rng(seed)
    case = np.arange(n_prompts) % 2 == 1
    tokens = rng.integers(4, 16, n_prompts)
    effect = np.where(np.arange(n_cols) % 3 == 0, np.linspace(0, 0.15, n_cols), 0.0)
    counts = rng.binomial(tokens[:, None], 0.3 + np.outer(case, effect)).astype(np.int32)
    return [("synthetic", 0, counts, tokens, case, None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--cap", type=int, default=5000 if QUICK else 20_000)
    ap.add_argument("--stop", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=100 if QUICK else 1000)
    ap.add_argument("--repeats", type=int, default=1 if QUICK else 2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    real = ROUTING.joinpath("manifest.json").is_file() and PROMPTS.is_file() and not QUICK
    problems = (routed_problems() if real
                else synthetic_problem(60 if QUICK else 359, 64 if QUICK else 480, args.seed))
    stop = SequentialStop(args.cap, args.stop)

    def run(sequential: bool, chunk: int = 128) -> tuple[float, float, list]:
        """(permutation seconds, inference seconds, per-problem PermutationResult)."""
        perm_s = total_s = 0.0
        results = []
        for _, index, counts, tok, case, rows in problems:
            rng = np.random.default_rng([args.seed, index, 0])
            t0 = time.perf_counter()
            res = (sequential_permutation_test(counts, tok, case, args.permutations, rng, stop,
                                               chunk, rows) if sequential else
                   permutation_test(counts, tok, case, args.permutations, rng, chunk, rows))
            t1 = time.perf_counter()
            bootstrap_ci(counts, tok, case, args.bootstrap,
                         np.random.default_rng([args.seed, index, 1]), rows=rows)
            perm_s += t1 - t0
            total_s += time.perf_counter() - t0
            results.append(res)
        return perm_s, total_s, results

    fixed_t, seq_t = [], []
    for _ in range(args.repeats):  # alternately, so both see the same load
        fixed_t.append(run(False))
        seq_t.append(run(True))
    fixed, seq = fixed_t[-1][2], seq_t[-1][2]
    other_chunk = run(True, chunk=48)[2]
    n = args.permutations
    equal = all(
        np.array_equal(s.null_max, f.null_max)
        and np.array_equal(s.p_value[s.n_drawn == n], f.p_value[s.n_drawn == n])
        and np.array_equal(s.p_value, o.p_value) and np.array_equal(s.n_drawn, o.n_drawn)
        for s, f, o in zip(seq, fixed, other_chunk, strict=True)
    )
    fixed_s, seq_s = min(t[1] for t in fixed_t), min(t[1] for t in seq_t)
    fixed_perm_s, seq_perm_s = min(t[0] for t in fixed_t), min(t[0] for t in seq_t)
    contrasts = {}
    for (name, _, counts, tok, *_), s, f in zip(problems, seq, fixed, strict=True):
        contrasts[name] = {
            "prompts": len(tok),
            "columns": counts.shape[1],
            "beyond_fixed": int((s.n_drawn > n).sum()),
            "at_cap": int((s.n_drawn == args.cap).sum()),
            "max_draws": int(s.n_drawn.max()),
            "q_le_0.05_fixed": int((bh_qvalues(f.p_value) <= 0.05).sum()),
            "q_le_0.05_sequential": int((bh_qvalues(s.p_value) <= 0.05).sum()),
        }
        print(f"{name}: {contrasts[name]}")
    print(f"{'data/routing' if real else 'synthetic'}: inference (permutations + bootstrap "
          f"x{args.bootstrap}) fixed x{n} {fixed_s:.3f} s, sequential (cap {args.cap}, h "
          f"{args.stop}) {seq_s:.3f} s; permutations alone {fixed_perm_s:.3f} s vs "
          f"{seq_perm_s:.3f} s")
    result = {
        "bench": "risk_diff_sequential",
        "ratio": round(seq_s / fixed_s, 2),
        "equal": bool(equal),
        "goal": "ratio <= 3",  # see the module docstring
        "baseline": f"fixed_{n}_permutations",
        "data": "data/routing" if real else "synthetic",
        "fixed_s": round(fixed_s, 4),
        "sequential_s": round(seq_s, 4),
        "ratio_permutations_only": round(seq_perm_s / fixed_perm_s, 2),
        "fixed_permutations_s": round(fixed_perm_s, 4),
        "sequential_permutations_s": round(seq_perm_s, 4),
        "permutations": n,
        "cap": args.cap,
        "stop_exceedances": args.stop,
        "bootstrap": args.bootstrap,
        "contrasts": contrasts,
        "repeats": args.repeats,
        "quick": QUICK,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
