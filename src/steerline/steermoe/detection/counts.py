"""Routing shards -> per-prompt routing counts: the one pass over the tokens of a risk difference.

The shards are streamed in record batches and vectorized into a per-prompt count matrix
[n_prompts, n_layers * n_experts] (one bincount per prompt run of a batch, or per batch when
prompts are short), from which the pooled counts, every permutation and every bootstrap draw
(see inference) follow; no per-token array of the whole set is ever held. Parquet decoding (a
reader thread) and the manifest's SHA-256 check (a second thread) run beside the counting;
pyarrow and hashlib release the GIL.

A token is in scope by `token_scope`: "user" (the prompt's own text: neither generated nor chat
template), "generated" (the model's answer), "all", or "target" (the target span of a paired
chat, steermoe.data.paired_chat: the is_target column only such captures have).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerline.core.errors import UserError
from steerline.steermoe.routing.manifest import read_routing_manifest, verify_routing_hashes
from steerline.steermoe.routing.reader import iter_routing_shard_batches, read_routing_meta
from steerline.steermoe.routing.schema import (
    LABELS,
    META_N_EXPERTS,
    META_N_LAYERS,
    META_TARGET,
    META_TOP_K,
)

TOKEN_SCOPES = ("user", "generated", "all")
#: the target spans of paired chats (a capture with META_TARGET); apart from TOKEN_SCOPES, whose
#: reads need only READ_COLUMNS and which every capture can count
TARGET_SCOPE = "target"
SCOPES = (*TOKEN_SCOPES, TARGET_SCOPE)
# the routing columns counting reads (the others, e.g. weights, are never decoded)
READ_COLUMNS = ("prompt_id", "label", "is_generated", "is_template", "experts")
TARGET_COLUMNS = (*READ_COLUMNS, "is_target")
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


def column_sums(counts: np.ndarray, select: np.ndarray, rows_per_step: int = 1024) -> np.ndarray:
    """[C] int64: counts[select].sum(0) (select: [P] bool) in steps of rows, so the selected
    rows are never copied at once (a [P, C] matrix can be most of the memory)."""
    out = np.zeros(counts.shape[1], np.int64)
    for lo in range(0, len(counts), rows_per_step):
        pick = select[lo : lo + rows_per_step]
        if pick.any():
            out += counts[lo : lo + rows_per_step][pick].sum(0, dtype=np.int64)
    return out


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
    if token_scope == TARGET_SCOPE:
        return _bool_column(batch, "is_target", shard)
    if token_scope == "all":
        return None
    generated = _bool_column(batch, "is_generated", shard)
    if token_scope == "generated":
        return generated
    return ~generated & ~_bool_column(batch, "is_template", shard)


def _experts_matrix(
    batch: pa.RecordBatch, n_layers: int, top_k: int, n_experts: int, shard: str | Path,
    first_row: int = 0,
) -> np.ndarray:
    """The experts column as an integer array [rows, n_layers, top_k] (no per-row Python).
    `first_row`: the shard row of the batch's first row, from 0 (an error names the shard's
    row counted from 1, as the prompt files' errors do)."""
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
    experts = flat.reshape(len(lengths), n_layers, top_k)
    if top_k > 1:
        # counting (token, slot) pairs counts tokens only if a token's top-k experts at a layer
        # are distinct. Each slot is compared with the slots before it on a copy that holds
        # every slot contiguous, [top_k, rows * n_layers]: about 6x faster than sorting each
        # row's top-k (10 ms for 16384 rows of 48 layers x top-8)
        slots = np.ascontiguousarray(np.moveaxis(experts, -1, 0)).reshape(top_k, -1)
        repeated = np.zeros(slots.shape[1], bool)
        for i in range(1, top_k):
            repeated |= (slots[:i] == slots[i]).any(axis=0)
        if repeated.any():
            row, layer = divmod(int(np.flatnonzero(repeated)[0]), n_layers)
            ids, times = np.unique(experts[row, layer], return_counts=True)
            raise ValueError(
                f"routing shard {shard}: row {first_row + row + 1} (prompt "
                f"{batch.column('prompt_id')[row].as_py()!r}) lists expert "
                f"{ids[times > 1][0]} twice in its top-{top_k} at layer {layer} (a "
                "token's experts at a layer are distinct): delete data/routing and rerun "
                "capture_routing"
            )
    return experts


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
    if token_scope not in SCOPES:
        raise ValueError(f"token_scope must be one of {SCOPES}, got {token_scope!r}")
    columns = TARGET_COLUMNS if token_scope == TARGET_SCOPE else READ_COLUMNS
    path = Path(routing_dir)
    if not path.is_dir():  # a single shard file: no manifest to check
        meta = read_routing_meta(path)
        _check_target_capture(meta, token_scope, routing_dir)
        batches = iter_routing_shard_batches(path, columns, batch_rows, progress)
        return count_batches(_prefetch(batches), meta, token_scope, source=str(routing_dir))
    # every check of verify_routing but the SHA-256 pass, which reads every byte of every shard:
    # it runs in a thread beside the counting, and nothing is returned before it passed
    meta = read_routing_meta(path, check_hashes=False)
    _check_target_capture(meta, token_scope, routing_dir)
    manifest = read_routing_manifest(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashed = pool.submit(verify_routing_hashes, path, manifest)
        try:
            batches = iter_routing_shard_batches(path, columns, batch_rows, progress)
            counts = count_batches(_prefetch(batches), meta, token_scope, str(routing_dir),
                                   expected_prompts=int(manifest.get("n_prompts", 0)))  # fmt: skip
        except Exception:
            if hashed.exception() is not None:  # a changed shard explains what went wrong
                raise hashed.exception() from None
            raise
        hashed.result()
    return counts


def _check_target_capture(meta: Mapping[str, Any], token_scope: str, where: str | Path) -> None:
    if token_scope == TARGET_SCOPE and str(meta.get(META_TARGET)) != "1":
        raise UserError(
            f"token scope 'target' counts the target spans of paired-chat prompts, but the "
            f"routing in {where} was captured without any: add a paired_chat source to "
            "prepare_safety.sources (docs/own_behaviour.md) and rerun capture_routing, or set "
            "risk_diff.token_scope to user, generated or all"
        )


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
    prompt_id, label, is_generated, is_template, experts. Refuses (one ValueError naming the
    shard and its row) a token whose top-k at one layer lists an expert twice, which the
    routing contract rules out: only then does counting (token, slot) pairs count tokens. The
    result does not depend on how the rows are cut into batches. `expected_prompts`: a
    capacity hint (see _PromptAccumulator).
    """
    if token_scope not in SCOPES:
        raise ValueError(f"token_scope must be one of {SCOPES}, got {token_scope!r}")
    columns = TARGET_COLUMNS if token_scope == TARGET_SCOPE else READ_COLUMNS
    n_layers, top_k, n_experts = (int(meta[k]) for k in (META_N_LAYERS, META_TOP_K, META_N_EXPERTS))
    width = n_layers * n_experts
    acc = _PromptAccumulator(width, expected_prompts)
    # [n_layers, 1] offset of each layer's block in the flattened (layer, expert) axis, in the
    # narrowest type that holds every column index (int16 for up to 32767 columns)
    col_type = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    layer_base = (np.arange(n_layers) * n_experts).astype(col_type)[:, None]

    next_row: dict[str, int] = {}  # per shard: its row at the start of the next batch
    for shard, batch in batches:
        first_row = next_row.get(str(shard), 0)
        next_row[str(shard)] = first_row + batch.num_rows
        missing = [c for c in columns if c not in batch.schema.names]
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

        # [rows, L, k]
        experts = _experts_matrix(batch, n_layers, top_k, n_experts, shard, first_row)
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
    source: str,
) -> PromptCounts:
    n = len(acc.ids)
    label, tokens, all_tokens = acc.label[:n], acc.tokens[:n], acc.all_tokens[:n]
    if n == 0:
        raise ValueError(f"the routing shards in {source} hold no tokens: rerun capture_routing")
    present = {LABELS[v] for v in np.unique(label)}
    if len(present) < 2:
        (only,) = present
        raise ValueError(
            f"only {only!r} prompts in {source} ({n} prompts): the risk difference compares "
            "safe with unsafe prompts; capture both labels (check prepare_safety's output)"
        )
    for value, name in enumerate(LABELS):
        if tokens[label == value].sum() == 0:
            raise ValueError(
                f"no {name} tokens in scope {token_scope!r} (of {all_tokens[label == value].sum()} "
                f"{name} tokens in {source}): {_SCOPE_HINT}"
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
