"""The statistics of a risk difference: prompt-level inference (label permutations and a bootstrap
over prompts), the token-level two-proportion z-test, Benjamini-Hochberg q-values and the
quantiles of the permutation null.

Tokens of one prompt share that prompt's words, so they are not independent draws: the prompt is
the unit that is exchanged under the null and resampled for a confidence interval. Inputs are
per-prompt count matrices (never per-token arrays), so the cost does not grow with tokens:
- counts [P, C] int: in-scope tokens of prompt p whose top-k holds column c (c = layer * E + e);
- tokens [P] int: in-scope tokens of prompt p (every entry >= 1);
- case [P] bool: True for the contrast's first group (e.g. unsafe), False for the reference.

risk difference of column c = sum_case counts / sum_case tokens - sum_ref counts / sum_ref tokens.
Each chunk of permutations or bootstrap draws is one matmul [chunk, P] @ [P, block] per block of
columns: only one block of the counts is ever converted to floating point, and a contrast over a
subset of prompts (`rows`) gathers only that block's rows, so the memory beyond the caller's
[P, C] integer matrix stays bounded (O(P * block)) at any scale. Results depend only on the
generator's state, never on `chunk` or the block width: draws are made one replicate at a time
in a fixed order, every sum is of integers exact in the float type used (_matmul_dtype), and
the max over columns is the max over blocks. sequential_permutation_test draws on beyond the
fixed shuffles for the columns they leave unresolved (docs/risk_diff_pvalues.md), equally
independent of chunk, step and block.

The z-test over tokens (two_proportion_pvalue) is anti-conservative: it counts every token as an
independent draw. It is reported beside the prompt-level p-values, not instead of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr  # norm.sf(x) is ndtr(-x); scipy.stats takes a second to import

from steerline.steermoe.detection.counts import PromptCounts, column_sums

# |risk difference| of a permutation counts as "at least as extreme" as the observed one within
# this absolute tolerance (identical float operations give identical values; this absorbs the
# last-bit differences between summation orders).
_TIE_TOL = 1e-12
# Quantiles of the null's max |risk_diff| always reported (if the permutations resolve them).
REPORTED_QUANTILES = (0.95, 0.99, 0.999)


def _matmul_dtype(bound: int) -> type:
    """float32 sums integers exactly below 2**24 (and is twice as fast); float64 otherwise."""
    return np.float32 if bound < 2**24 else np.float64


# Bytes of one column block converted to floating point (its [P, block] copy, all rows taking
# part): wide enough for an efficient matmul, small beside the [P, C] integer matrix (~1 GB at
# 40k prompts x 48 layers x 128 experts, where the risk_diff stage must stay under 2 GB).
_BLOCK_BYTES = 64 << 20
_GATHER_ROWS = 4096  # rows converted per step: no integer copy of a whole block


def _blocks(n_rows: int, n_cols: int, dtype) -> list[tuple[int, int]]:
    width = max(64, _BLOCK_BYTES // (max(n_rows, 1) * np.dtype(dtype).itemsize))
    return [(c, min(c + width, n_cols)) for c in range(0, n_cols, width)]


def _gather(counts: np.ndarray, rows: np.ndarray | None, c0: int, c1: int, dtype) -> np.ndarray:
    """counts[rows, c0:c1] as `dtype` [P', c1 - c0]: a copy of one block only, converted in
    steps of rows."""
    n = len(counts) if rows is None else len(rows)
    out = np.empty((n, c1 - c0), dtype)
    for lo in range(0, n, _GATHER_ROWS):
        hi = min(lo + _GATHER_ROWS, n)
        out[lo:hi] = counts[lo:hi, c0:c1] if rows is None else counts[rows[lo:hi], c0:c1]
    return out


def _gather_columns(
    counts: np.ndarray, rows: np.ndarray | None, cols: np.ndarray, dtype
) -> np.ndarray:
    """counts[rows][:, cols] as `dtype` [P', len(cols)], converted in steps of rows."""
    n = len(counts) if rows is None else len(rows)
    out = np.empty((n, len(cols)), dtype)
    for lo in range(0, n, _GATHER_ROWS):
        hi = min(lo + _GATHER_ROWS, n)
        out[lo:hi] = counts[lo:hi, cols] if rows is None else counts[np.ix_(rows[lo:hi], cols)]
    return out


def _check(
    counts: np.ndarray, tokens: np.ndarray, case: np.ndarray, rows: np.ndarray | None = None
) -> None:
    n = len(counts) if rows is None else len(rows)
    if counts.ndim != 2 or tokens.shape != (n,) or case.shape != (n,):
        raise ValueError(
            f"shapes must be counts [P, C], tokens [P], case [P] (P = len(rows) with rows); got "
            f"{counts.shape}, {tokens.shape}, {case.shape}"
        )
    if case.all() or not case.any():
        raise ValueError("a contrast needs prompts on both sides (case and reference)")
    if (tokens < 1).any():
        raise ValueError("every prompt needs at least one in-scope token")


def _sides_of(n: int, rows: np.ndarray | None, case: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[P_all] bool masks of the case and reference prompts among all rows of counts."""
    idx = np.arange(n) if rows is None else rows
    case_all, ref_all = np.zeros(n, bool), np.zeros(n, bool)
    case_all[idx[case]] = True
    ref_all[idx[~case]] = True
    return case_all, ref_all


def risk_difference(
    counts: np.ndarray, tokens: np.ndarray, case: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """[C] float64: case rate minus reference rate, pooled over each side's tokens. With
    `rows` ([P'] indices), only those rows of counts take part (tokens, case: [P'])."""
    case_all, ref_all = _sides_of(len(counts), rows, case)
    a_case = column_sums(counts, case_all)  # [C]
    col_total = a_case + column_sums(counts, ref_all)
    n_case = int(tokens[case].sum())
    return _rd(a_case.astype(np.float64), float(n_case), col_total, int(tokens.sum()))


def _rd(
    a_case: np.ndarray, n_case: np.ndarray | float, col_total: np.ndarray, total: int
) -> np.ndarray:
    """Risk difference from case sums; the reference side is the complement of the total."""
    return a_case / n_case - (col_total - a_case) / (total - n_case)


@dataclass(frozen=True)
class PermutationResult:
    p_value: np.ndarray  # [C] two-sided: (1 + #{|rd*| >= |rd|}) / (1 + draws of that column)
    null_max: np.ndarray  # [n_permutations] max over columns of |rd*| (the family-wise null)
    n_drawn: np.ndarray  # [C] int64 shuffles each column's p-value counts over


@dataclass(frozen=True)
class SequentialStop:
    """Besag & Clifford's (1991) sequential stopping for the columns that the first
    n_permutations shuffles leave unresolved (fewer than `exceedances` |rd*| >= |rd|)."""

    max_permutations: int  # shuffles a column may reach: smallest p 1 / (1 + max_permutations)
    exceedances: int  # h: an unresolved column stops at its h-th exceedance


# Shuffles per step once columns draw beyond n_permutations: few Python steps, little work past
# a column's stopping draw; the [step, P] shuffles in floating point stay under _STEP_BYTES.
_SEQUENTIAL_STEP = 1024
_STEP_BYTES = 16 << 20


@dataclass(frozen=True)
class _Problem:
    """What every shuffle of one contrast is compared with."""

    dtype: type  # of the matmuls (_matmul_dtype)
    total: int  # in-scope tokens of the prompts taking part
    col_total: np.ndarray  # [C] float64: tokens routed to each column, both sides
    observed: np.ndarray  # [C] float64: |rd| less the tie tolerance


def _problem(
    counts: np.ndarray, tokens: np.ndarray, case: np.ndarray, rows: np.ndarray | None
) -> _Problem:
    total = int(tokens.sum())
    case_all, ref_all = _sides_of(len(counts), rows, case)
    col_total = (column_sums(counts, case_all) + column_sums(counts, ref_all)).astype(np.float64)
    observed = np.abs(risk_difference(counts, tokens, case, rows)) - _TIE_TOL
    return _Problem(_matmul_dtype(total), total, col_total, observed)


def _fixed_draws(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    chunk: int,
    rows: np.ndarray | None,
    prob: _Problem,
) -> tuple[np.ndarray, np.ndarray]:
    """([C] int64 exceedances, [n_permutations] null max) over the first n_permutations
    shuffles, every column; the generator is left after the last of them."""
    n_cols, dtype = counts.shape[1], prob.dtype
    # every shuffle first (the generator's order), [n_permutations, P] bool: ~P bytes each
    perms = np.stack([rng.permutation(case) for _ in range(n_permutations)])
    chunks = [(s, min(s + chunk, n_permutations)) for s in range(0, n_permutations, chunk)]
    tok = tokens.astype(dtype)  # [P]
    n_case = np.concatenate([(perms[s:e].astype(dtype) @ tok).astype(np.float64)
                             for s, e in chunks])[:, None]  # [n_permutations, 1]  # fmt: skip
    beyond = np.zeros(n_cols, np.int64)
    null_max = np.full(n_permutations, -np.inf)
    for c0, c1 in _blocks(len(tokens), n_cols, dtype):
        mat = _gather(counts, rows, c0, c1, dtype)  # [P, b]
        for s, e in chunks:
            a_case = (perms[s:e].astype(dtype) @ mat).astype(np.float64)  # [m, b]
            rd = np.abs(_rd(a_case, n_case[s:e], prob.col_total[c0:c1], prob.total))  # [m, b]
            beyond[c0:c1] += (rd >= prob.observed[c0:c1]).sum(0)
            np.maximum(null_max[s:e], rd.max(axis=1), out=null_max[s:e])
    return beyond, null_max


def permutation_test(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    chunk: int = 128,
    rows: np.ndarray | None = None,
) -> PermutationResult:
    """Per-column permutation p-values and the max-|rd| null, from one set of label shuffles.

    The case labels are permuted among the P prompts (the number of case prompts is kept; token
    counts follow their prompts). The smallest attainable p-value is 1 / (1 + n_permutations).
    With n_permutations == 0 the p-values are NaN and the null is empty. `rows` ([P'] indices
    into counts): only those prompts take part (tokens, case: [P']), without copying them.
    """
    first = _first_shuffles(counts, tokens, case, n_permutations, rng, chunk, rows)
    if isinstance(first, PermutationResult):
        return first
    _, beyond, null_max, drawn = first
    return PermutationResult((1.0 + beyond) / (1.0 + n_permutations), null_max, drawn)


def _first_shuffles(
    counts: np.ndarray, tokens: np.ndarray, case: np.ndarray, n_permutations: int,
    rng: np.random.Generator, chunk: int, rows: np.ndarray | None,
) -> PermutationResult | tuple[_Problem, np.ndarray, np.ndarray, np.ndarray]:
    """What both permutation tests start with: the inputs checked, then (the problem, beyond
    [C], null_max [n_permutations], drawn [C] = n_permutations) of the first n_permutations
    shuffles; with n_permutations <= 0 the NaN result instead."""
    _check(counts, tokens, case, rows)
    n_cols = counts.shape[1]
    if n_permutations <= 0:
        return PermutationResult(np.full(n_cols, np.nan), np.zeros(0), np.zeros(n_cols, np.int64))
    prob = _problem(counts, tokens, case, rows)
    beyond, null_max = _fixed_draws(counts, tokens, case, n_permutations, rng, chunk, rows, prob)
    return prob, beyond, null_max, np.full(n_cols, n_permutations, np.int64)


def sequential_permutation_test(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    stop: SequentialStop,
    chunk: int = 128,
    rows: np.ndarray | None = None,
) -> PermutationResult:
    """permutation_test's p-values, resolved further where the first shuffles cannot.

    Every column counts the first n_permutations shuffles (those of permutation_test, whose
    null_max is returned unchanged): a column with at least stop.exceedances exceedances among
    them keeps that p-value. Each other column counts the next shuffles of the same generator,
    in order, until its stop.exceedances-th exceedance or stop.max_permutations shuffles
    (Besag & Clifford 1991). p = (1 + exceedances) / (1 + shuffles counted) throughout: the
    fixed test's p, and at a stop h / L raised to (h + 1) / (L + 1) (L >= h), so a valid
    p-value. A column's p depends on the shuffle sequence alone (never on `chunk`, the step
    or which other columns still draw), so the result is deterministic given the generator.
    """
    if stop.max_permutations < n_permutations or stop.exceedances < 1:
        raise ValueError(
            f"sequential stopping needs max_permutations >= n_permutations ({n_permutations}) "
            f"and exceedances >= 1, got {stop}"
        )
    first = _first_shuffles(counts, tokens, case, n_permutations, rng, chunk, rows)
    if isinstance(first, PermutationResult):
        return first
    prob, beyond, null_max, drawn = first
    active = np.flatnonzero(beyond < stop.exceedances)  # [A] columns still drawing
    size = np.dtype(prob.dtype).itemsize
    step = max(chunk, min(_SEQUENTIAL_STEP, _STEP_BYTES // (len(case) * size)))
    # columns per matmul: the [P, b] block as in _blocks, and each [step, b] float64 result
    # under _STEP_BYTES too
    width = max(64, min(_BLOCK_BYTES // (len(case) * size), _STEP_BYTES // (step * 8)))
    tok = tokens.astype(prob.dtype)
    start = n_permutations
    while active.size and start < stop.max_permutations:
        end = min(start + step, stop.max_permutations)
        pf = _key_shuffles(rng, case, end - start).astype(prob.dtype)  # [m, P]
        n_case = (pf @ tok).astype(np.float64)[:, None]  # [m, 1]
        for b0 in range(0, active.size, width):
            cols = active[b0 : b0 + width]  # [b]
            mat = _gather_columns(counts, rows, cols, prob.dtype)  # [P, b]
            a_case = (pf @ mat).astype(np.float64)  # [m, b]
            rd = np.abs(_rd(a_case, n_case, prob.col_total[cols], prob.total))
            _count_until(rd >= prob.observed[cols], cols, start, stop.exceedances, beyond, drawn)
        active = active[beyond[active] < stop.exceedances]
        start = end
    return PermutationResult((1.0 + beyond) / (1.0 + drawn), null_max, drawn)


def _key_shuffles(rng: np.random.Generator, case: np.ndarray, m: int) -> np.ndarray:
    """[m, P] bool: m label shuffles, each giving the case label to the k (= case.sum())
    prompts with the smallest of P uniform keys: a uniform k-subset, as rng.permutation(case)
    gives, about twice as fast at P ~ 400. Shuffle r reads the generator's next P doubles, so any
    grouping of the same shuffles into steps draws the same ones."""
    k = int(case.sum())
    keys = rng.random((m, len(case)))  # [m, P]
    out = keys <= np.partition(keys, k - 1, axis=1)[:, k - 1 : k]
    # equal keys at the k-th (about P**2 * 2**-54 a shuffle) would give more than k: the first
    # k of a stable sort instead
    for r in np.flatnonzero(out.sum(1) != k):
        out[r] = False
        out[r, np.argsort(keys[r], kind="stable")[:k]] = True
    return out


def _count_until(
    hit: np.ndarray, cols: np.ndarray, start: int, h: int, beyond: np.ndarray, drawn: np.ndarray
) -> None:
    """Add the exceedances hit [m, b] (shuffles start .. start + m - 1 of columns `cols`) to
    beyond / drawn, in place, stopping each column at its h-th exceedance."""
    before = beyond[cols]
    after = before + hit.sum(0)
    done = after >= h  # [b] columns whose h-th exceedance is in this step
    # the shuffle of the h-th: the first row where the running count reaches h
    at = np.argmax(before[done] + np.cumsum(hit[:, done], axis=0) >= h, axis=0)
    beyond[cols] = np.minimum(after, h)
    drawn[cols] = start + len(hit)
    drawn[cols[done]] = start + at + 1


def bootstrap_ci(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
    chunk: int = 128,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI [C], [C] of the risk difference, resampling prompts with
    replacement within each side (each side keeps its number of prompts). NaN when
    n_bootstrap == 0. `rows`: as in permutation_test."""
    _check(counts, tokens, case, rows)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_cols = counts.shape[1]
    if n_bootstrap <= 0:
        return np.full(n_cols, np.nan), np.full(n_cols, np.nan)
    local = [np.flatnonzero(case), np.flatnonzero(~case)]  # [P_side] positions among the P
    sides = [idx if rows is None else rows[idx] for idx in local]  # [P_side] rows of counts
    # a resampled side sums at most (its prompts) x (the longest prompt's tokens)
    dtype = _matmul_dtype(int(tokens.max()) * len(tokens))
    # every replicate's multiplicities first, in the generator's order (per replicate: the case
    # side's draw, then the reference side's): [B, P_side] each, in the narrowest exact type
    weights = [np.empty((n_bootstrap, len(idx)), np.uint16 if len(idx) < 2**16 else np.int64)
               for idx in local]  # fmt: skip
    for r in range(n_bootstrap):
        for w, idx in zip(weights, local, strict=True):
            w[r] = np.bincount(rng.integers(0, len(idx), len(idx)), minlength=len(idx))
    chunks = [(s, min(s + chunk, n_bootstrap)) for s in range(0, n_bootstrap, chunk)]
    dens = [  # [B, 1] per side: resampled tokens
        np.concatenate([(w[s:e].astype(dtype) @ tokens[idx].astype(dtype)).astype(np.float64)
                        for s, e in chunks])[:, None]  # fmt: skip
        for w, idx in zip(weights, local, strict=True)
    ]
    draws = np.empty((n_bootstrap, n_cols))  # [B, C]
    for c0, c1 in _blocks(sum(len(idx) for idx in sides), n_cols, dtype):  # both sides' rows
        mats = [_gather(counts, idx, c0, c1, dtype) for idx in sides]  # [P_side, b]
        for s, e in chunks:
            rates = [
                (w[s:e].astype(dtype) @ mat).astype(np.float64) / den[s:e]  # [m, b]
                for w, mat, den in zip(weights, mats, dens, strict=True)
            ]
            draws[s:e, c0:c1] = rates[0] - rates[1]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail], axis=0)
    return low, high


def two_proportion_pvalue(
    a1: np.ndarray, n1: np.ndarray | int, a2: np.ndarray, n2: np.ndarray | int
) -> np.ndarray:
    """Two-sided pooled-variance z-test of a1/n1 == a2/n2; p = 1 where the variance is 0."""
    a1, a2 = np.asarray(a1, np.float64), np.asarray(a2, np.float64)
    n1, n2 = np.asarray(n1, np.float64), np.asarray(n2, np.float64)
    pooled = (a1 + a2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    ok = var > 0
    z = np.divide(
        a2 / n2 - a1 / n1,
        np.sqrt(var, where=ok, out=np.ones_like(var)),
        where=ok,
        out=np.zeros_like(var),
    )
    return np.where(ok, 2.0 * ndtr(-np.abs(z)), 1.0)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: q_(i) = min_{j>=i} p_(j) m / j, capped at 1."""
    p = np.asarray(p, np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


def permutation_null(
    counts: PromptCounts, n_permutations: int, seed: int, chunk: int = 128
) -> np.ndarray:
    """Max |risk_diff| over all (layer, expert) under shuffled prompt labels: [n_permutations].

    Labels are permuted among the prompts (the number of unsafe prompts is kept; token counts
    then follow the prompts). Each chunk of permutations is one matmul
    [chunk, P] @ [P, L*E]. Deterministic given `seed`, whatever `chunk`.
    """
    rng = np.random.default_rng(seed)
    return permutation_test(
        counts.counts, counts.tokens, counts.unsafe, n_permutations, rng, chunk
    ).null_max


def check_null_quantile(n_permutations: int, null_quantile: float) -> None:
    """A quantile q needs >= 1/(1-q) permutations to be more than the null's sample maximum."""
    if not 0.0 < null_quantile < 1.0:
        raise ValueError(f"null_quantile must be in (0, 1), got {null_quantile}")
    if n_permutations > 0 and n_permutations * (1.0 - null_quantile) < 1.0 - 1e-9:
        need = math.ceil(1.0 / (1.0 - null_quantile) - 1e-9)
        raise ValueError(
            f"risk_diff.null_quantile={null_quantile} needs at least {need} permutations, got "
            f"risk_diff.n_permutations={n_permutations}: raise n_permutations or lower "
            "null_quantile in params.yaml"
        )


def null_quantiles(null: np.ndarray, null_quantile: float) -> dict[str, float]:
    """{quantile: max |risk_diff|} for the reported quantiles the permutations resolve."""
    if not null.size:
        return {}
    wanted = sorted(
        {*(q for q in REPORTED_QUANTILES if null.size * (1 - q) >= 1 - 1e-9), float(null_quantile)}
    )
    out = {f"{q:g}": float(np.quantile(null, q)) for q in wanted}  # 0.99 -> "0.99"
    out["max"] = float(null.max())
    return out
