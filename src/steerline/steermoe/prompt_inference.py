"""Prompt-level inference for a risk difference: label permutations and a bootstrap over prompts.

Tokens of one prompt share that prompt's words, so they are not independent draws: the prompt is
the unit that is exchanged under the null and resampled for a confidence interval. Inputs are
per-prompt count matrices (never per-token arrays), so the cost does not grow with tokens:
- counts [P, C] int: in-scope tokens of prompt p whose top-k holds column c (c = layer * E + e);
- tokens [P] int: in-scope tokens of prompt p (every entry >= 1);
- case [P] bool: True for the contrast's first group (e.g. unsafe), False for the reference.

risk difference of column c = sum_case counts / sum_case tokens - sum_ref counts / sum_ref tokens.
Each chunk of permutations or bootstrap draws is one matmul [chunk, P] @ [P, C]. Results depend
only on the generator's state, never on `chunk` (draws are made one replicate at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# |risk difference| of a permutation counts as "at least as extreme" as the observed one within
# this absolute tolerance (identical float operations give identical values; this absorbs the
# last-bit differences between summation orders).
_TIE_TOL = 1e-12


def _matmul_dtype(bound: int) -> type:
    """float32 sums integers exactly below 2**24 (and is twice as fast); float64 otherwise."""
    return np.float32 if bound < 2**24 else np.float64


def _check(counts: np.ndarray, tokens: np.ndarray, case: np.ndarray) -> None:
    if counts.ndim != 2 or tokens.shape != (len(counts),) or case.shape != (len(counts),):
        raise ValueError(
            f"shapes must be counts [P, C], tokens [P], case [P]; got {counts.shape}, "
            f"{tokens.shape}, {case.shape}"
        )
    if case.all() or not case.any():
        raise ValueError("a contrast needs prompts on both sides (case and reference)")
    if (tokens < 1).any():
        raise ValueError("every prompt needs at least one in-scope token")


def risk_difference(counts: np.ndarray, tokens: np.ndarray, case: np.ndarray) -> np.ndarray:
    """[C] float64: case rate minus reference rate, pooled over each side's tokens."""
    col_total = counts.sum(0, dtype=np.int64)  # [C]
    a_case = counts[case].sum(0, dtype=np.int64)  # [C]
    n_case = int(tokens[case].sum())
    return _rd(a_case.astype(np.float64), float(n_case), col_total, int(tokens.sum()))


def _rd(
    a_case: np.ndarray, n_case: np.ndarray | float, col_total: np.ndarray, total: int
) -> np.ndarray:
    """Risk difference from case sums; the reference side is the complement of the total."""
    return a_case / n_case - (col_total - a_case) / (total - n_case)


@dataclass(frozen=True)
class PermutationResult:
    p_value: np.ndarray  # [C] two-sided: (1 + #{|rd*| >= |rd|}) / (1 + n_permutations)
    null_max: np.ndarray  # [n_permutations] max over columns of |rd*| (the family-wise null)


def permutation_test(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    chunk: int = 128,
) -> PermutationResult:
    """Per-column permutation p-values and the max-|rd| null, from one set of label shuffles.

    The case labels are permuted among the P prompts (the number of case prompts is kept; token
    counts follow their prompts). The smallest attainable p-value is 1 / (1 + n_permutations).
    With n_permutations == 0 the p-values are NaN and the null is empty.
    """
    _check(counts, tokens, case)
    n_cols = counts.shape[1]
    if n_permutations <= 0:
        return PermutationResult(np.full(n_cols, np.nan), np.zeros(0))
    total = int(tokens.sum())
    dtype = _matmul_dtype(total)
    mat = counts.astype(dtype)  # [P, C]
    tok = tokens.astype(dtype)  # [P]
    col_total = counts.sum(0, dtype=np.int64).astype(np.float64)  # [C]
    observed = np.abs(risk_difference(counts, tokens, case)) - _TIE_TOL  # [C]
    beyond = np.zeros(n_cols, np.int64)
    null_max = np.empty(n_permutations)
    for start in range(0, n_permutations, chunk):
        m = min(chunk, n_permutations - start)
        perm = np.stack([rng.permutation(case) for _ in range(m)]).astype(dtype)  # [m, P]
        a_case = (perm @ mat).astype(np.float64)  # [m, C]
        n_case = (perm @ tok).astype(np.float64)[:, None]  # [m, 1]
        rd = np.abs(_rd(a_case, n_case, col_total, total))  # [m, C]
        beyond += (rd >= observed).sum(0)
        null_max[start : start + m] = rd.max(axis=1)
    return PermutationResult((1.0 + beyond) / (1.0 + n_permutations), null_max)


def bootstrap_ci(
    counts: np.ndarray,
    tokens: np.ndarray,
    case: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
    chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI [C], [C] of the risk difference, resampling prompts with
    replacement within each side (each side keeps its number of prompts). NaN when
    n_bootstrap == 0."""
    _check(counts, tokens, case)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_cols = counts.shape[1]
    if n_bootstrap <= 0:
        return np.full(n_cols, np.nan), np.full(n_cols, np.nan)
    sides = [np.flatnonzero(case), np.flatnonzero(~case)]
    # a resampled side sums at most (its prompts) x (the longest prompt's tokens)
    dtype = _matmul_dtype(int(tokens.max()) * len(tokens))
    mats = [counts[idx].astype(dtype) for idx in sides]  # [P_side, C]
    toks = [tokens[idx].astype(dtype) for idx in sides]  # [P_side]
    draws = np.empty((n_bootstrap, n_cols))  # [B, C]
    for start in range(0, n_bootstrap, chunk):
        m = min(chunk, n_bootstrap - start)
        # per replicate, the case side's draw then the reference side's: [m, P_side] each, the
        # multiplicity of every prompt in a resample of that side's size
        weights = [np.empty((m, len(idx)), dtype) for idx in sides]
        for r in range(m):
            for w, idx in zip(weights, sides, strict=True):
                w[r] = np.bincount(rng.integers(0, len(idx), len(idx)), minlength=len(idx))
        rates = [
            (w @ mat).astype(np.float64) / (w @ tok).astype(np.float64)[:, None]  # [m, C]
            for w, mat, tok in zip(weights, mats, toks, strict=True)
        ]
        draws[start : start + m] = rates[0] - rates[1]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail], axis=0)
    return low, high
