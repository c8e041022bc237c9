"""SteerMoE risk difference: how much more often unsafe prompts route a token to each expert.

For every (layer, expert): a[label] = in-scope tokens of that label whose top-k at that layer
holds the expert, n[label] = in-scope tokens; risk_diff = a_unsafe/n_unsafe - a_safe/n_safe.

Inference is at the level of prompts (tokens of one prompt are not independent): per pair a
label-permutation p-value (`p_perm`, BH `q_perm`) and a bootstrap CI over prompts (`ci_low`,
`ci_high`), see prompt_inference. The two-proportion z-test over tokens is kept beside them as
`p_token_z` / `q_token_z` (anti-conservative: it counts every token as an independent draw).
The same columns, prefixed, hold the style-matched contrast (`matched_*`) and the pure style
contrast (`style_risk_diff`), see contrasts.

Everything is streamed over the routing shards in record batches and vectorized into a
per-prompt count matrix [n_prompts, n_layers * n_experts] (one bincount per prompt run of a
batch, or per batch when prompts are short), from which the pooled counts, every permutation and
every bootstrap draw (one matmul per chunk and column block) follow; no per-token array of the
whole set is ever held. Parquet decoding (a reader thread) and the manifest's SHA-256 check (a
second thread) run beside the counting; pyarrow and hashlib release the GIL.
"""

from __future__ import annotations

import io
import json
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import norm

from steerline.steermoe.data.contrasts import (
    AGREEMENT_PAIRS,
    CONTRASTS,
    MATCHED,
    POOLED,
    Contrast,
    agreement,
    contrast_sides,
    needs_sources,
    prompt_sources,
)
from steerline.steermoe.detection.inference import bootstrap_ci, column_sums, permutation_test
from steerline.steermoe.routing.schema import (
    LABELS,
    META_MODEL,
    META_N_EXPERTS,
    META_N_LAYERS,
    META_TOP_K,
    PER_SHARD_PREFIX,
    iter_routing_shard_batches,
    moe_layers_of,
    read_routing_manifest,
    read_routing_meta,
    verify_routing_hashes,
)

TOKEN_SCOPES = ("user", "generated", "all")
CONTRAST_BY_NAME = {c.name: c for c in CONTRASTS}
REPORT_COLUMNS = (
    "layer",
    "expert",
    "a_safe",
    "a_unsafe",
    "n_safe",
    "n_unsafe",
    "a_safe_n",
    "a_unsafe_n",
    "risk_diff",
    "ci_low",
    "ci_high",
    "p_perm",
    "q_perm",
    "p_token_z",
    "q_token_z",
)
# Per contrast with inference (columns prefixed by Contrast.prefix; pooled's prefix is "").
INFERENCE_COLUMNS = ("risk_diff", "ci_low", "ci_high", "p_perm", "q_perm", "p_token_z", "q_token_z")
# Quantiles of the null's max |risk_diff| always reported (if the permutations resolve them).
REPORTED_QUANTILES = (0.95, 0.99, 0.999)
_READ_COLUMNS = ("prompt_id", "label", "is_generated", "is_template", "experts")
# A batch whose prompts average fewer in-scope tokens than this is counted with one bincount
# over (prompt, layer, expert) bins, in groups of prompts of at most _MAX_BINS bins (its output
# is [bins] int64); otherwise with one bincount per prompt over (layer, expert), whose input is
# the narrow column index and whose bins stay in cache (about twice as fast per value).
_MIN_RUN = 32
_MAX_BINS = 1 << 22
_SCOPE_HINT = (
    "set risk_diff.token_scope to another of 'user', 'generated', 'all' in params.yaml, or check "
    "capture_routing ('generated' needs capture_routing.max_new_tokens > 0)"
)


@dataclass(frozen=True)
class PromptCounts:
    """In-scope routing counts aggregated per prompt (prompts with >= 1 in-scope token)."""

    prompt_ids: list[str]  # [P], first-seen order
    unsafe: np.ndarray  # [P] bool
    counts: np.ndarray  # [P, n_layers * n_experts] int32, column = layer * n_experts + expert
    tokens: np.ndarray  # [P] int64 in-scope tokens
    n_layers: int
    top_k: int
    n_experts: int
    token_scope: str
    routing_meta: dict[str, Any]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """a [2, L*E] int64 and n [2] int64, row 0 safe, row 1 unsafe."""
        a = np.stack([column_sums(self.counts, sel) for sel in (~self.unsafe, self.unsafe)])
        n = np.array([self.tokens[~self.unsafe].sum(), self.tokens[self.unsafe].sum()], np.int64)
        return a, n


class _PromptAccumulator:
    """Per-prompt counts with rows added as new prompt ids appear (capacity doubles)."""

    initial_capacity = 256

    def __init__(self, width: int, capacity: int | None = None) -> None:
        """`capacity`: the prompts expected (a routing manifest's n_prompts), so the [P, C]
        matrix is allocated once, never copied while growing (np.zeros pages in lazily)."""
        self.width = width
        self.row_of: dict[str, int] = {}
        self.ids: list[str] = []
        self._alloc(max(capacity or self.initial_capacity, 1))

    def _alloc(self, cap: int) -> None:
        old = getattr(self, "counts", None)
        counts = np.zeros((cap, self.width), np.int32)
        label = np.full(cap, -1, np.int8)  # -1 unseen, 0 safe, 1 unsafe
        tokens = np.zeros(cap, np.int64)
        all_tokens = np.zeros(cap, np.int64)
        if old is not None:  # copy the rows allocated so far (ids may already be past them)
            n = len(old)
            counts[:n], label[:n] = self.counts, self.label
            tokens[:n], all_tokens[:n] = self.tokens, self.all_tokens
        self.counts, self.label, self.tokens, self.all_tokens = counts, label, tokens, all_tokens

    def rows(self, ids: list[str]) -> np.ndarray:
        """Global row of each id (new ids get new rows); one dict lookup per prompt, not token."""
        out = np.empty(len(ids), np.int64)
        for i, pid in enumerate(ids):
            row = self.row_of.get(pid)
            if row is None:
                row = self.row_of[pid] = len(self.ids)
                self.ids.append(pid)
            out[i] = row
        if len(self.ids) > len(self.label):
            self._alloc(max(2 * len(self.label), len(self.ids)))
        return out


def _bool_column(batch: pa.RecordBatch, name: str, shard: str | Path) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        raise ValueError(f"routing shard {shard} has null values in column {name!r}")
    return col.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _scope_mask(batch: pa.RecordBatch, token_scope: str, shard: str | Path) -> np.ndarray | None:
    """[rows] bool of in-scope tokens, or None meaning all rows."""
    if token_scope == "all":
        return None
    generated = _bool_column(batch, "is_generated", shard)
    if token_scope == "generated":
        return generated
    return ~generated & ~_bool_column(batch, "is_template", shard)


def _experts_matrix(
    batch: pa.RecordBatch, n_layers: int, top_k: int, n_experts: int, shard: str | Path
) -> np.ndarray:
    """The experts column as an integer array [rows, n_layers, top_k] (no per-row Python)."""
    col = batch.column("experts")
    width = n_layers * top_k
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not (
        pa.types.is_integer(col.type.value_type)
    ):
        raise ValueError(
            f"routing shard {shard} column 'experts' must be list<int16>, not {col.type}"
        )
    if col.null_count:
        raise ValueError(f"routing shard {shard} has null rows in column 'experts'")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != width or lengths.max() != width):
        bad = int(lengths[lengths != width][0])
        raise ValueError(
            f"routing shard {shard} has an 'experts' list of length {bad}; its metadata says "
            f"n_layers*top_k = {n_layers}*{top_k} = {width}: delete data/routing and rerun "
            "capture_routing"
        )
    flat = col.flatten().to_numpy(zero_copy_only=False)  # honours the batch's slice offset
    if flat.size and (flat.min() < 0 or flat.max() >= n_experts):
        raise ValueError(
            f"routing shard {shard} has expert ids in [{flat.min()}, {flat.max()}], outside "
            f"[0, n_experts={n_experts}) from its metadata: delete data/routing and rerun "
            "capture_routing"
        )
    return flat.reshape(len(lengths), n_layers, top_k)


def count_routing(
    routing_dir: str | Path,
    token_scope: str = "user",
    batch_rows: int = 16384,
    progress: bool = False,
) -> PromptCounts:
    """Stream the routing shards once into per-prompt in-scope counts (see PromptCounts).

    Raises ValueError, naming what to fix, on: no shards, metadata disagreeing between shards,
    missing columns, bad labels or expert ids, a prompt with both labels, only one label
    present, no in-scope tokens of a label.
    """
    if token_scope not in TOKEN_SCOPES:
        raise ValueError(f"token_scope must be one of {TOKEN_SCOPES}, got {token_scope!r}")
    path = Path(routing_dir)
    if not path.is_dir():  # a single shard file: no manifest to check
        meta = read_routing_meta(path)
        batches = iter_routing_shard_batches(path, _READ_COLUMNS, batch_rows, progress)
        return count_batches(_prefetch(batches), meta, token_scope, source=str(routing_dir))
    # every check of verify_routing but the SHA-256 pass, which reads every byte of every shard:
    # it runs in a thread beside the counting, and nothing is returned before it passed
    meta = read_routing_meta(path, check_hashes=False)
    manifest = read_routing_manifest(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashed = pool.submit(verify_routing_hashes, path, manifest)
        try:
            batches = iter_routing_shard_batches(path, _READ_COLUMNS, batch_rows, progress)
            counts = count_batches(_prefetch(batches), meta, token_scope, str(routing_dir),
                                   expected_prompts=int(manifest.get("n_prompts", 0)))  # fmt: skip
        except Exception:
            if hashed.exception() is not None:  # a changed shard explains what went wrong
                raise hashed.exception() from None
            raise
        hashed.result()
    return counts


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of `items`, produced by a thread up to `depth` ahead: the next record batch is
    decoded (pyarrow releases the GIL) while this one is counted. The producer's exceptions are
    raised here; leaving early stops it."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as err:  # handed to the consumer, raised there
            put((False, err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="routing-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = out.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def count_batches(
    batches: Iterable[tuple[str | Path, pa.RecordBatch]],
    meta: Mapping[str, Any],
    token_scope: str = "user",
    source: str = "routing batches",
    expected_prompts: int | None = None,
) -> PromptCounts:
    """count_routing on (name, record batch) pairs already in memory (names go into errors).

    `meta` needs n_layers, top_k, n_experts (see read_routing_meta); batches need the columns
    prompt_id, label, is_generated, is_template, experts. Assumes (per the routing contract)
    that an expert appears at most once in a token's top-k at one layer, so counting
    (token, slot) pairs counts tokens. The result does not depend on how the rows are cut
    into batches. `expected_prompts`: a capacity hint (see _PromptAccumulator).
    """
    if token_scope not in TOKEN_SCOPES:
        raise ValueError(f"token_scope must be one of {TOKEN_SCOPES}, got {token_scope!r}")
    n_layers, top_k, n_experts = (int(meta[k]) for k in (META_N_LAYERS, META_TOP_K, META_N_EXPERTS))
    width = n_layers * n_experts
    acc = _PromptAccumulator(width, expected_prompts)
    # [n_layers, 1] offset of each layer's block in the flattened (layer, expert) axis, in the
    # narrowest type that holds every column index (int16 for up to 32767 columns)
    col_type = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    layer_base = (np.arange(n_layers) * n_experts).astype(col_type)[:, None]

    for shard, batch in batches:
        missing = [c for c in _READ_COLUMNS if c not in batch.schema.names]
        if missing:
            raise ValueError(f"routing batch from {shard} has no column {missing[0]!r}")
        if batch.num_rows == 0:
            continue
        pid = batch.column("prompt_id")
        if pid.null_count:
            raise ValueError(f"routing shard {shard} has null values in column 'prompt_id'")
        enc = pc.dictionary_encode(pid)
        local = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)  # [rows]
        ids = [str(x) for x in enc.dictionary.to_pylist()]
        n_local = len(ids)

        label = batch.column("label")
        bad = [v for v in pc.unique(label).to_pylist() if v not in LABELS]
        if bad:
            raise ValueError(
                f"routing shard {shard} has label {bad[0]!r}; labels must be 'safe' or 'unsafe'"
            )
        unsafe_tok = pc.equal(label, "unsafe").to_numpy(zero_copy_only=False).astype(bool)
        tok_per = np.bincount(local, minlength=n_local)  # [n_local]
        uns_per = np.bincount(local[unsafe_tok], minlength=n_local)
        mixed = np.flatnonzero((uns_per > 0) & (uns_per < tok_per))
        if mixed.size:
            raise ValueError(
                f"prompt {ids[mixed[0]]!r} in routing shard {shard} has both labels; every token "
                "of a prompt must carry the prompt's label"
            )
        lab_local = (uns_per > 0).astype(np.int8)
        rows = acc.rows(ids)
        prev = acc.label[rows]
        clash = np.flatnonzero((prev >= 0) & (prev != lab_local))
        if clash.size:
            raise ValueError(
                f"prompt {ids[clash[0]]!r} has label {LABELS[lab_local[clash[0]]]!r} in routing "
                f"shard {shard} but {LABELS[prev[clash[0]]]!r} elsewhere; delete data/routing and "
                "rerun capture_routing"
            )
        acc.label[rows] = lab_local
        acc.all_tokens[rows] += tok_per

        experts = _experts_matrix(batch, n_layers, top_k, n_experts, shard)  # [rows, L, k]
        mask = _scope_mask(batch, token_scope, shard)
        if mask is not None:
            experts, local = experts[mask], local[mask]
        if local.size == 0:
            continue
        cols = experts.astype(col_type, copy=False) + layer_base  # [n_in, L, k] column index
        _add_counts(acc.counts, rows, local, cols.reshape(len(local), -1), n_local)
        acc.tokens[rows] += np.bincount(local, minlength=n_local)

    return _finish(acc, dict(meta), n_layers, top_k, n_experts, token_scope, source)


def _add_counts(
    counts: np.ndarray, rows: np.ndarray, local: np.ndarray, cols: np.ndarray, n_local: int
) -> None:
    """counts[rows[p], c] += the batch's in-scope tokens of local prompt p that hit column c.

    counts [P, C] int32; rows [n_local] distinct global rows; local [n] local prompt of each
    in-scope token; cols [n, L*k] column (layer * E + expert) of each of its top-k slots.
    """
    width = counts.shape[1]
    if np.any(local[1:] < local[:-1]):  # a prompt's tokens not in one run: make them one
        order = np.argsort(local, kind="stable")
        local, cols = local[order], cols[order]
    bounds = np.searchsorted(local, np.arange(n_local + 1))  # [n_local + 1] run bounds
    if len(local) >= _MIN_RUN * n_local:
        for p in np.flatnonzero(np.diff(bounds)):
            counts[rows[p]] += np.bincount(cols[bounds[p] : bounds[p + 1]].ravel(), minlength=width)
        return
    step = max(1, _MAX_BINS // width)  # prompts per bincount
    for lo in range(0, n_local, step):
        hi = min(lo + step, n_local)
        r0, r1 = bounds[lo], bounds[hi]
        if r0 == r1:
            continue
        # flat bin = (prompt - lo, layer, expert): [n_run, L*k] int64
        bins = (local[r0:r1, None] - lo) * width + cols[r0:r1]
        hits = np.bincount(bins.ravel(), minlength=(hi - lo) * width).reshape(hi - lo, width)
        counts[rows[lo:hi]] += hits.astype(np.int32)  # rows are distinct: no scatter-add needed


def _finish(
    acc: _PromptAccumulator,
    meta: dict[str, Any],
    n_layers: int,
    top_k: int,
    n_experts: int,
    token_scope: str,
    routing_dir: str,
) -> PromptCounts:
    n = len(acc.ids)
    label, tokens, all_tokens = acc.label[:n], acc.tokens[:n], acc.all_tokens[:n]
    if n == 0:
        raise ValueError(
            f"the routing shards in {routing_dir} hold no tokens: rerun capture_routing"
        )
    present = {LABELS[v] for v in np.unique(label)}
    if len(present) < 2:
        (only,) = present
        raise ValueError(
            f"only {only!r} prompts in {routing_dir} ({n} prompts): the risk difference compares "
            "safe with unsafe prompts; capture both labels (check prepare_safety's output)"
        )
    for value, name in enumerate(LABELS):
        if tokens[label == value].sum() == 0:
            raise ValueError(
                f"no {name} tokens in scope {token_scope!r} (of {all_tokens[label == value].sum()} "
                f"{name} tokens in {routing_dir}): {_SCOPE_HINT}"
            )
    keep = tokens > 0  # a prompt without in-scope tokens takes no part, also not in permutations
    return PromptCounts(
        prompt_ids=[pid for pid, k in zip(acc.ids, keep, strict=True) if k],
        unsafe=label[keep] == 1,
        counts=_keep_rows(acc.counts, n, keep),
        tokens=tokens[keep].copy(),
        n_layers=n_layers,
        top_k=top_k,
        n_experts=n_experts,
        token_scope=token_scope,
        routing_meta=meta,
    )


def _keep_rows(counts: np.ndarray, n: int, keep: np.ndarray, step: int = 1024) -> np.ndarray:
    """counts[:n][keep], compacted in place (a view, no second [P, C] matrix): a kept row only
    moves up, and every step's source rows lie at or below the rows it writes."""
    if keep.all():
        return counts[:n]
    idx = np.flatnonzero(keep)
    for lo in range(0, len(idx), step):
        counts[lo : lo + len(idx[lo : lo + step])] = counts[idx[lo : lo + step]]
    return counts[: len(idx)]


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
    return np.where(ok, 2.0 * norm.sf(np.abs(z)), 1.0)


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


def risk_diff_table(counts: PromptCounts) -> pd.DataFrame:
    """One row per (layer, expert) with REPORT_COLUMNS, sorted by layer, expert; the
    prompt-level columns (ci_low, ci_high, p_perm, q_perm) are NaN (compute_risk_diff fills
    them)."""
    (a_safe, a_unsafe), (n_safe, n_unsafe) = counts.pooled()
    rate_safe, rate_unsafe = a_safe / n_safe, a_unsafe / n_unsafe
    p = two_proportion_pvalue(a_safe, n_safe, a_unsafe, n_unsafe)
    size = a_safe.size
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(moe_layers_of(counts.routing_meta), dtype=np.int32),
                               counts.n_experts),
            "expert": np.tile(np.arange(counts.n_experts, dtype=np.int32), counts.n_layers),
            "a_safe": a_safe,
            "a_unsafe": a_unsafe,
            "n_safe": np.full(size, n_safe, np.int64),
            "n_unsafe": np.full(size, n_unsafe, np.int64),
            "a_safe_n": rate_safe,
            "a_unsafe_n": rate_unsafe,
            "risk_diff": rate_unsafe - rate_safe,
            "ci_low": np.full(size, np.nan),
            "ci_high": np.full(size, np.nan),
            "p_perm": np.full(size, np.nan),
            "q_perm": np.full(size, np.nan),
            "p_token_z": p,
            "q_token_z": bh_qvalues(p),
        },
        columns=list(REPORT_COLUMNS),
    )


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


def _qkey(q: float) -> str:
    return f"{q:g}"


def _null_quantiles(null: np.ndarray, null_quantile: float) -> dict[str, float]:
    """{quantile: max |risk_diff|} for the reported quantiles the permutations resolve."""
    if not null.size:
        return {}
    wanted = sorted(
        {*(q for q in REPORTED_QUANTILES if null.size * (1 - q) >= 1 - 1e-9), float(null_quantile)}
    )
    out = {_qkey(q): float(np.quantile(null, q)) for q in wanted}
    out["max"] = float(null.max())
    return out


def contrast_columns(
    counts: PromptCounts,
    contrast: Contrast,
    sides: np.ndarray,
    n_permutations: int,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    """The report columns of one contrast (named with its prefix), its permutation null
    [n_permutations] (max |risk_diff|) and its prompt/token counts per side.

    sides [P]: 1 case, 0 reference, -1 left out (contrasts.contrast_sides). Random streams are
    seeded by (seed, contrast index, purpose), so adding a contrast changes no other one.
    """
    keep = sides >= 0
    # the prompts taking part, by index: the [P, C] matrix is never copied (only column blocks)
    rows = None if keep.all() else np.flatnonzero(keep)
    tok, case = counts.tokens[keep], sides[keep] == 1
    mat = counts.counts
    a_case = column_sums(mat, sides == 1)  # [C]
    a_ref = column_sums(mat, sides == 0)
    n_case, n_ref = int(tok[case].sum()), int(tok[~case].sum())
    rd = a_case / n_case - a_ref / n_ref
    sizes = {
        "prompts_case": int(case.sum()),
        "prompts_reference": int((~case).sum()),
        "tokens_case": n_case,
        "tokens_reference": n_ref,
    }
    cols: dict[str, np.ndarray] = {f"{contrast.prefix}risk_diff": rd}
    null = np.zeros(0)
    if contrast.inferred:
        index = CONTRASTS.index(contrast)
        perm = permutation_test(
            mat, tok, case, n_permutations, np.random.default_rng([seed, index, 0]), rows=rows
        )
        low, high = bootstrap_ci(
            mat, tok, case, n_bootstrap, np.random.default_rng([seed, index, 1]), ci_level,
            rows=rows,
        )
        p_z = two_proportion_pvalue(a_ref, n_ref, a_case, n_case)
        values = {
            "ci_low": low,
            "ci_high": high,
            "p_perm": perm.p_value,
            "q_perm": bh_qvalues(perm.p_value) if n_permutations > 0 else perm.p_value,
            "p_token_z": p_z,
            "q_token_z": bh_qvalues(p_z),
        }
        cols.update({f"{contrast.prefix}{k}": v for k, v in values.items()})
        null = perm.null_max
    return cols, null, sizes


def compute_risk_diff(
    routing_dir: str | Path,
    token_scope: str = "user",
    n_permutations: int = 1000,
    null_quantile: float = 0.99,
    seed: int = 0,
    batch_rows: int = 16384,
    progress: bool = False,
    prompts: pd.DataFrame | None = None,
    n_bootstrap: int = 0,
    ci_level: float = 0.95,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The risk_diff report and its Parquet metadata (all values strings).

    Columns: REPORT_COLUMNS (the pooled contrast); with `prompts` (the prompt table: prompt_id,
    label, source) also every other contrast of contrasts.CONTRASTS, prefixed (matched_*:
    INFERENCE_COLUMNS, style_risk_diff). n_permutations == 0 / n_bootstrap == 0 leave p_perm /
    q_perm / CI columns NaN.

    Metadata: token_scope, n_layers, top_k, n_experts, model (plus the routing's other shared
    keys), prompt/token counts per label, n_permutations, n_bootstrap, ci_level, seed,
    null_quantile, null_quantiles (JSON {quantile: max |risk_diff|}), contrasts (JSON: per
    contrast its groups, prompt/token counts and null threshold), and, with permutations,
    null_threshold (the quantile `null_quantile` of the pooled null) and n_beyond_null.
    """
    check_null_quantile(n_permutations, null_quantile)
    counts = count_routing(routing_dir, token_scope, batch_rows, progress)
    source = None
    if prompts is not None:
        source = prompt_sources(counts.prompt_ids, counts.unsafe, prompts, "the prompt table")
    df = risk_diff_table(counts)
    contrasts: dict[str, Any] = {}
    null = np.zeros(0)
    for contrast in CONTRASTS:
        if source is None and needs_sources(contrast):
            continue
        sides = contrast_sides(contrast, source, counts.unsafe)
        cols, c_null, sizes = contrast_columns(
            counts, contrast, sides, n_permutations, n_bootstrap, ci_level, seed
        )
        if contrast is POOLED:
            # same values as risk_diff_table's (the same integer sums), checked, not assumed
            assert np.array_equal(cols["risk_diff"], df["risk_diff"].to_numpy())
            null = c_null
        for name, values in cols.items():
            df[name] = values
        info: dict[str, Any] = {
            "case": [list(g) for g in contrast.case],
            "reference": [list(g) for g in contrast.reference],
            **sizes,
        }
        if c_null.size:
            info["null_threshold"] = float(np.quantile(c_null, null_quantile))
        contrasts[contrast.name] = info

    meta: dict[str, str] = {
        k: str(v) for k, v in counts.routing_meta.items() if not k.startswith(PER_SHARD_PREFIX)
    }
    meta.update(
        {
            "token_scope": token_scope,
            "n_prompts_safe": str(int((~counts.unsafe).sum())),
            "n_prompts_unsafe": str(int(counts.unsafe.sum())),
            "n_tokens_safe": str(int(df["n_safe"].iloc[0])),
            "n_tokens_unsafe": str(int(df["n_unsafe"].iloc[0])),
            "n_permutations": str(n_permutations),
            "n_bootstrap": str(n_bootstrap),
            "ci_level": repr(float(ci_level)),
            "seed": str(seed),
            "null_quantile": repr(float(null_quantile)),
            "contrasts": json.dumps(contrasts),
        }
    )
    quantiles = _null_quantiles(null, null_quantile)
    if null.size:
        threshold = float(np.quantile(null, null_quantile))
        meta["null_threshold"] = repr(threshold)
        meta["n_beyond_null"] = str(int((df["risk_diff"].abs() > threshold).sum()))
    meta["null_quantiles"] = json.dumps(quantiles)
    return df, meta


def _top_rows(df: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    top = df.reindex(df["risk_diff"].abs().sort_values(ascending=False, kind="stable").index)
    return [
        {
            "layer": int(r.layer),
            "expert": int(r.expert),
            "risk_diff": float(r.risk_diff),
            "ci_low": float(r.ci_low),
            "ci_high": float(r.ci_high),
            "q_perm": float(r.q_perm),
            "q_token_z": float(r.q_token_z),
        }
        for r in top.head(n).itertuples()
    ]


def _significant(df: pd.DataFrame, prefix: str, alpha: float) -> dict[str, int]:
    """Pairs with q <= alpha at prompt level (permutations) and at token level (z-test)."""
    perm = (df[f"{prefix}q_perm"] <= alpha).to_numpy()
    token = (df[f"{prefix}q_token_z"] <= alpha).to_numpy()
    return {
        "q_perm": int(perm.sum()),
        "q_token_z": int(token.sum()),
        "token_only": int((token & ~perm).sum()),
    }


def contrast_agreement(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Spearman and top-n overlap of the risk differences of each pair of contrasts present."""
    out = {}
    for first, second in AGREEMENT_PAIRS:
        cols = [f"{CONTRAST_BY_NAME[name].prefix}risk_diff" for name in (first, second)]
        if all(c in df.columns for c in cols):
            out[f"{first}_{second}"] = agreement(df[cols[0]].to_numpy(), df[cols[1]].to_numpy())
    return out


def risk_diff_summary(df: pd.DataFrame, meta: Mapping[str, str], alpha: float = 0.05) -> dict:
    """Small metrics dict for reports/risk_diff_summary.json (flat keys DVC can diff)."""
    null_q = json.loads(meta.get("null_quantiles", "{}"))
    summary: dict[str, Any] = {
        "token_scope": meta["token_scope"],
        "model": meta.get(META_MODEL, ""),
        "tokens": {"safe": int(meta["n_tokens_safe"]), "unsafe": int(meta["n_tokens_unsafe"])},
        "prompts": {"safe": int(meta["n_prompts_safe"]), "unsafe": int(meta["n_prompts_unsafe"])},
        "max_abs_risk_diff": float(df["risk_diff"].abs().max()),
        "alpha": alpha,
        # pairs with q <= alpha, per contrast: prompt level (q_perm) vs token level (q_token_z)
        "significant": {
            c.name: _significant(df, c.prefix, alpha)
            for c in CONTRASTS
            if c.inferred and f"{c.prefix}q_perm" in df.columns
        },
        # prompts / tokens per side and the null's threshold (the groups are in the metadata)
        "contrasts": {
            name: {k: v for k, v in info.items() if k not in ("case", "reference")}
            for name, info in json.loads(meta.get("contrasts", "{}")).items()
        },
        "agreement": contrast_agreement(df),
        "top": _top_rows(df, 5),
        "null": {
            "n_permutations": int(meta["n_permutations"]),
            # keys without dots so `dvc metrics show` does not split them
            "max_abs_risk_diff": {
                ("max" if k == "max" else "q" + k.replace("0.", "")): v for k, v in null_q.items()
            },
        },
    }
    if "null_threshold" in meta:
        summary["null"]["quantile"] = float(meta["null_quantile"])
        summary["null"]["threshold"] = float(meta["null_threshold"])
        summary["null"]["n_beyond"] = int(meta["n_beyond_null"])
    return summary


def plot_rows(df: pd.DataFrame, n_each: int = 10) -> pd.DataFrame:
    """The n_each highest and n_each lowest (pooled) risk differences, for a DVC bar plot, with
    the matched contrast's value beside when the report has it."""
    order = df.sort_values(["risk_diff", "layer", "expert"], kind="stable")
    picked = pd.concat([order.tail(n_each), order.head(n_each)])
    picked = picked.drop_duplicates(["layer", "expert"])
    picked = picked.sort_values("risk_diff", ascending=False, kind="stable")
    out = pd.DataFrame(
        {
            "pair": [f"L{r.layer:02d} E{r.expert:03d}" for r in picked.itertuples()],
            "layer": picked["layer"].to_numpy(),
            "expert": picked["expert"].to_numpy(),
            "risk_diff": picked["risk_diff"].to_numpy(),
            "q_perm": picked["q_perm"].to_numpy(),
        }
    )
    matched = f"{MATCHED.prefix}risk_diff"
    if matched in picked.columns:
        out[matched] = picked[matched].to_numpy()
    return out


def heatmap_png(
    df: pd.DataFrame, meta: Mapping[str, str], alpha: float = 0.05, dpi: int = 100
) -> bytes:
    """PNG bytes of layer x expert heatmaps of risk_diff, diverging and centred at 0: one panel
    per contrast with inference in the report (pooled, and matched when present), on one colour
    scale. Pairs with prompt-level q_perm <= alpha are circled. Rendered in memory (no pyplot
    global state) so the stage writes nothing until everything is computed.
    """
    from matplotlib.figure import Figure

    n_layers, n_experts = max(moe_layers_of(meta)) + 1, int(meta[META_N_EXPERTS])
    panels = [c for c in CONTRASTS if c.inferred and f"{c.prefix}risk_diff" in df.columns]
    layer, expert = df["layer"].to_numpy(), df["expert"].to_numpy()
    grids = []
    for c in panels:
        grid = np.full((n_layers, n_experts), np.nan)  # [L, E]; dense layers stay blank
        grid[layer, expert] = df[f"{c.prefix}risk_diff"].to_numpy()
        grids.append(grid)
    lim = max(max(float(np.nanmax(np.abs(g))) for g in grids), 1e-6)
    width = min(3.0 + 0.16 * n_experts, 24.0)
    fig = Figure(
        figsize=(min(width * len(panels), 36.0), min(2.0 + 0.2 * n_layers, 16.0)),
        layout="constrained",
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    info = json.loads(meta.get("contrasts", "{}"))
    for ax, c, grid in zip(axes, panels, grids, strict=True):
        im = ax.imshow(
            grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
        )
        title = c.name
        if c.name in info:
            title += f" ({info[c.name]['prompts_case']} vs {info[c.name]['prompts_reference']})"
        q = df[f"{c.prefix}q_perm"].to_numpy()
        if not np.isnan(q).all():
            hit = q <= alpha
            ax.scatter(expert[hit], layer[hit], s=30, facecolors="none", edgecolors="black",
                       linewidths=0.8)  # fmt: skip
            title += f"\n{int(hit.sum())} circled: q_perm <= {alpha:g}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), label="risk diff (case - reference)")
    fig.suptitle(f"{meta.get(META_MODEL, '')}  scope={meta['token_scope']}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
