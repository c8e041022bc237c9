"""Sequential permutation p-values (inference.sequential_permutation_test, risk_diff.p_method):
the fixed test's draws kept, the refined columns equal to a literal loop over the same shuffle
sequence, invariant to chunk / step / column blocking, and within Monte Carlo error of a large
fixed-permutation reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import beta, binom, nbinom
from test_risk_diff import E, K, L, prompt_table, random_routing, write_shards

from steerline.core.params import RiskDiff
from steerline.steermoe.detection import inference
from steerline.steermoe.detection.inference import (
    SequentialStop,
    bh_qvalues,
    permutation_test,
    sequential_permutation_test,
)
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.routing.schema import routing_metadata


def planted(
    n_per_side: int = 20, n_cols: int = 40, seed: int = 0, top: float = 0.3
) -> tuple[np.ndarray, ...]:
    """counts [P, C], tokens [P], case [P]: column c routes a case prompt's tokens with rate
    0.3 + effect_c, effects from 0 to `top` (0.3: p-values from ~1e-5 to 1 at 20 a side)."""
    rng = np.random.default_rng(seed)
    case = np.arange(2 * n_per_side) % 2 == 1  # [P]
    tokens = rng.integers(4, 16, case.size)  # [P]
    effect = np.linspace(0.0, top, n_cols)  # [C]
    rate = 0.3 + np.outer(case, effect)  # [P, C]
    counts = rng.binomial(tokens[:, None], rate).astype(np.int32)
    return counts, tokens, case


def literal(
    counts: np.ndarray, tokens: np.ndarray, case: np.ndarray, n: int, stop: SequentialStop,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(p [C], draws [C]) by the rule in words, one shuffle at a time: the first n shuffles are
    rng.permutation(case); then the case label goes to the k prompts with the smallest of P
    uniform keys; a column that has fewer than h exceedances after n shuffles counts on until
    its h-th or the cap; p = (1 + exceedances) / (1 + shuffles counted)."""
    rng = np.random.default_rng(seed)

    def abs_rd(lab: np.ndarray) -> np.ndarray:
        a, n_case = counts[lab].sum(0), tokens[lab].sum()
        rest = counts.sum(0) - a
        return np.abs(a / n_case - rest / (tokens.sum() - n_case))

    observed = abs_rd(case) - 1e-12
    beyond = np.zeros(counts.shape[1], np.int64)
    for _ in range(n):
        beyond += abs_rd(rng.permutation(case)) >= observed
    drawn = np.full(counts.shape[1], n)
    going = beyond < stop.exceedances
    for i in range(n, stop.max_permutations):
        if not going.any():
            break
        lab = np.zeros(case.size, bool)
        lab[np.argsort(rng.random(case.size))[: case.sum()]] = True
        beyond[going] += (abs_rd(lab) >= observed)[going]
        drawn[going] = i + 1
        going &= beyond < stop.exceedances
    return (1.0 + beyond) / (1.0 + drawn), drawn


def test_sequential_equals_the_rule_in_words_and_keeps_the_fixed_draws() -> None:
    counts, tokens, case = planted(n_per_side=8, n_cols=12, top=0.6)
    stop = SequentialStop(max_permutations=3000, exceedances=5)
    seq = sequential_permutation_test(counts, tokens, case, 200, np.random.default_rng(3), stop)
    p, drawn = literal(counts, tokens, case, 200, stop, seed=3)
    assert np.array_equal(seq.n_drawn, drawn)
    assert np.array_equal(seq.p_value, p)
    # the columns refined, stopped before the cap and at it: every branch of the rule ran
    assert (drawn == 200).any() and ((drawn > 200) & (drawn < 3000)).any() and (drawn == 3000).any()
    fixed = permutation_test(counts, tokens, case, 200, np.random.default_rng(3))
    assert np.array_equal(seq.null_max, fixed.null_max)
    kept = drawn == 200
    assert np.array_equal(seq.p_value[kept], fixed.p_value[kept])
    assert (seq.p_value[~kept] < fixed.p_value[~kept]).any()


def test_the_same_whatever_the_chunk_step_and_column_blocks(monkeypatch) -> None:
    counts, tokens, case = planted(n_per_side=10, n_cols=300, seed=2)
    stop = SequentialStop(max_permutations=6000, exceedances=10)

    def run(chunk: int) -> inference.PermutationResult:
        return sequential_permutation_test(counts, tokens, case, 500, np.random.default_rng(9),
                                           stop, chunk=chunk)

    ref = run(128)
    assert (ref.n_drawn > 500).sum() > 10  # many columns draw beyond the fixed shuffles
    # tiny steps and blocks: many steps, several column blocks, columns leaving mid-step
    monkeypatch.setattr(inference, "_SEQUENTIAL_STEP", 37)
    monkeypatch.setattr(inference, "_STEP_BYTES", 37 * 64 * 8)
    monkeypatch.setattr(inference, "_BLOCK_BYTES", 64 * counts.shape[0] * 4)
    for chunk in (1, 37, 1000):
        other = run(chunk)
        for a, b in zip((ref.p_value, ref.n_drawn, ref.null_max),
                        (other.p_value, other.n_drawn, other.null_max), strict=True):
            assert np.array_equal(a, b)
    # the prompts taking part by index (a contrast's rows) give the same as the copied subset
    rows = np.arange(counts.shape[0] + 5)[5:]
    padded = np.concatenate([counts[:5] * 0 + 7, counts])
    by_rows = sequential_permutation_test(padded, tokens, case, 500, np.random.default_rng(9),
                                          stop, rows=rows)
    assert np.array_equal(by_rows.p_value, ref.p_value)


# The agreement test's Monte Carlo bands: each a two-sided 99.9% interval.
BAND = 0.999


def test_agrees_with_a_large_fixed_reference_within_monte_carlo_error() -> None:
    """Each column's sequential outcome lies in its 99.9% band under any p in the reference's
    99.9% Clopper-Pearson interval (20,000 fixed shuffles, another seed): the exceedances among
    1,000 shuffles ~ Binomial(1000, p) for a column kept at the fixed draws, the draws at the
    h-th exceedance ~ h + NegBinomial(h, p) for a column that stopped, the exceedances at the
    cap ~ Binomial(cap, p). BH q-values: within a factor 2.5 of the reference's wherever the
    reference's q <= 0.5 (a p from h = 10 exceedances has relative error ~1/sqrt(10) = 0.32, so
    a 99.9% deviation is ~2x), closer than the fixed 1,000 shuffles' q, and the same selections
    at q <= 0.01 / 0.05 for every column whose reference q is not within 2.5x of that level."""
    counts, tokens, case = planted()
    n, h, cap, n_ref = 1000, 10, 20_000, 20_000
    seq = sequential_permutation_test(counts, tokens, case, n, np.random.default_rng(1),
                                      SequentialStop(cap, h))
    ref = permutation_test(counts, tokens, case, n_ref, np.random.default_rng(2))
    b_ref = np.rint(ref.p_value * (n_ref + 1) - 1)
    tail = (1 - BAND) / 2
    p_lo = np.where(b_ref > 0, beta.ppf(tail, np.maximum(b_ref, 1), n_ref - b_ref + 1), 0.0)
    p_hi = beta.ppf(1 - tail, b_ref + 1, n_ref - b_ref)
    b = np.rint(seq.p_value * (seq.n_drawn + 1) - 1)  # exceedances counted
    drawn = seq.n_drawn
    kinds = {"kept": drawn == n, "stopped": (drawn > n) & (b == h), "capped": drawn == cap}
    assert all(kinds[k].sum() >= 3 for k in kinds), {k: int(v.sum()) for k, v in kinds.items()}
    for c in range(counts.shape[1]):
        lo, hi = max(p_lo[c], 1e-12), p_hi[c]
        if kinds["stopped"][c]:  # failures before the h-th success: fewer at a larger p
            fails = drawn[c] - h
            assert nbinom.ppf(tail, h, hi) <= fails <= nbinom.ppf(1 - tail, h, lo), c
        else:
            m = n if kinds["kept"][c] else cap
            assert binom.ppf(tail, m, lo) <= b[c] <= binom.ppf(1 - tail, m, hi), c
    q_seq, q_ref = bh_qvalues(seq.p_value), bh_qvalues(ref.p_value)
    fixed = permutation_test(counts, tokens, case, n, np.random.default_rng(1))
    close = q_ref <= 0.5
    assert close.sum() >= 20
    gap = np.abs(np.log(q_seq[close] / q_ref[close]))
    assert gap.max() <= np.log(2.5)
    # the fixed 1,000 shuffles' q-values are further off: their p stops at 1/1001
    assert gap.max() < np.abs(np.log(bh_qvalues(fixed.p_value)[close] / q_ref[close])).max()
    for alpha in (0.01, 0.05):  # the same selection wherever q_ref is not within 2.5x of alpha
        clear = np.abs(np.log(q_ref / alpha)) > np.log(2.5)
        assert np.array_equal((q_seq <= alpha)[clear], (q_ref <= alpha)[clear])
    # and the small p the fixed 1,000 cannot give: the floor 1/1001 is passed by many columns
    assert (seq.p_value < 1 / (n + 1)).sum() >= 5


def test_params_and_the_report(tmp_path: Path) -> None:
    base = {"token_scope": "user", "n_permutations": 1000, "null_quantile": 0.99,
            "n_bootstrap": 10, "ci_level": 0.95, "p_max_permutations": 500,
            "p_stop_exceedances": 10}
    RiskDiff(**base, p_method="fixed")  # the cap is read by the sequential method only
    with pytest.raises(ValidationError, match="below n_permutations"):
        RiskDiff(**base, p_method="sequential")
    arrays = random_routing(np.random.default_rng(4), n_prompts=60)
    meta = routing_metadata(L, K, E, "tiny-moe", backend="transformers")
    routing = write_shards(tmp_path / "routing", arrays, 2, meta)
    kw = {"n_permutations": 100, "null_quantile": 0.95, "n_bootstrap": 20,
          "prompts": prompt_table(arrays)}
    fixed, meta_f = compute_risk_diff(routing, **kw)
    default, _ = compute_risk_diff(routing, **kw, p_method="fixed", p_max_permutations=7)
    assert fixed.equals(default)
    seq, meta_s = compute_risk_diff(routing, **kw, p_method="sequential",
                                    p_max_permutations=5000, p_stop_exceedances=10)
    assert "p_method" not in meta_f and meta_s["p_method"] == "sequential"
    # the null (its quantiles, threshold) and every column but the p / q ones are the fixed run's
    for key in ("null_quantiles", "null_threshold", "n_beyond_null"):
        assert meta_s[key] == meta_f[key]
    same = [c for c in fixed.columns if not c.endswith(("p_perm", "q_perm"))]
    assert fixed[same].equals(seq[same])
    info = json.loads(meta_s["contrasts"])["pooled"]
    assert 0 < info["refined_columns"] and info["max_draws"] <= 5000
    assert (seq["p_perm"] != fixed["p_perm"]).sum() <= info["refined_columns"]


def test_detect_takes_the_method_from_its_flag(tmp_path: Path, monkeypatch) -> None:
    """`steerline detect --p-method fixed` (outside the project: the schema's CliDefault
    values, so sequential without the flag)."""
    import argparse

    from steerline.cli import detect

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    detect.add_parser(parser.add_subparsers(), "detect")
    files = ["detect", "--unsafe", "u.txt", "--safe", "s.txt"]
    risk, *_ = detect.settings(parser.parse_args(files))
    assert risk.p_method == "sequential" and risk.p_max_permutations >= risk.n_permutations
    risk, *_ = detect.settings(parser.parse_args([*files, "--p-method", "fixed"]))
    assert risk.p_method == "fixed"
