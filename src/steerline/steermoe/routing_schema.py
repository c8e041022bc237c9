"""The routing artifact (data/routing/*.parquet): schema, metadata, checked streaming reads.

One row per token; `experts` / `weights` hold n_layers * top_k entries, layer-major (the top_k
expert ids of layer 0, then layer 1, ...). Shards are written by capture_routing and read by
risk_diff; both import the names below so the contract lives in one place (docs: DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROUTING_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("label", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("is_generated", pa.bool_()),
        ("is_template", pa.bool_()),
        ("experts", pa.list_(pa.int16())),
        ("weights", pa.list_(pa.float16())),
    ]
)
LABELS = ("safe", "unsafe")
# Required Parquet key-value metadata of every shard; values are strings on disk.
META_N_LAYERS = "n_layers"
META_TOP_K = "top_k"
META_N_EXPERTS = "n_experts"
META_MODEL = "model"
META_KEYS = (META_N_LAYERS, META_TOP_K, META_N_EXPERTS, META_MODEL)
_INT_KEYS = (META_N_LAYERS, META_TOP_K, META_N_EXPERTS)
# Extra keys with this prefix may differ between shards (e.g. shard_index); all others must agree.
PER_SHARD_PREFIX = "shard_"

_RERUN = "delete data/routing and rerun capture_routing (dvc repro capture_routing)"


def routing_metadata(
    n_layers: int, top_k: int, n_experts: int, model: str, **extra: object
) -> dict[str, str]:
    """Key-value metadata for one routing shard (pass it to steerline.io.write_table).

    `extra` (e.g. backend="transformers") must agree across the shards of one capture, except
    keys starting with "shard_".
    """
    if not (n_layers >= 1 and top_k >= 1 and n_experts >= top_k):
        raise ValueError(
            f"bad routing shape n_layers={n_layers} top_k={top_k} n_experts={n_experts}: "
            "need n_layers >= 1 and 1 <= top_k <= n_experts"
        )
    meta = {
        META_N_LAYERS: str(int(n_layers)),
        META_TOP_K: str(int(top_k)),
        META_N_EXPERTS: str(int(n_experts)),
        META_MODEL: str(model),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def routing_table(
    prompt_id: Sequence[str],
    label: Sequence[str],
    position: np.ndarray,
    token_id: np.ndarray,
    is_generated: np.ndarray,
    is_template: np.ndarray,
    experts: np.ndarray,
    weights: np.ndarray,
) -> pa.Table:
    """Build a ROUTING_SCHEMA table from per-token arrays; experts/weights are [N, n_layers*top_k].

    Vectorized (one flat buffer plus offsets), so capture can write large shards cheaply.
    """
    experts = np.asarray(experts)
    weights = np.asarray(weights)
    if experts.ndim != 2 or experts.shape != weights.shape:
        raise ValueError(
            f"experts and weights must both be [N, n_layers*top_k]; got {experts.shape} "
            f"and {weights.shape}"
        )
    n, width = experts.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, type=pa.int32())

    def lists(flat: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), type=typ))

    columns = [
        pa.array(prompt_id, type=pa.string()),
        pa.array(label, type=pa.string()),
        pa.array(np.asarray(position, dtype=np.int32)),
        pa.array(np.asarray(token_id, dtype=np.int32)),
        pa.array(np.asarray(is_generated, dtype=bool)),
        pa.array(np.asarray(is_template, dtype=bool)),
        lists(experts.astype(np.int16, copy=False), pa.int16()),
        lists(weights.astype(np.float16, copy=False), pa.float16()),
    ]
    return pa.Table.from_arrays(columns, schema=ROUTING_SCHEMA)


def routing_shards(routing_dir: str | Path) -> list[Path]:
    """The shard files of a routing directory (or a single shard file), sorted by name."""
    path = Path(routing_dir)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not shards:
        raise ValueError(
            f"no routing shards (*.parquet) in {path}: run capture_routing first "
            "(dvc repro capture_routing)"
        )
    return shards


def _shard_meta(shard: Path) -> dict[str, str]:
    raw = pq.read_schema(shard).metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k != b"pandas"}
    for key in META_KEYS:
        if key not in meta:
            raise ValueError(
                f"routing shard {shard} lacks metadata key {key!r} (needs {list(META_KEYS)}): "
                f"{_RERUN}"
            )
    for key in _INT_KEYS:
        try:
            ok = int(meta[key]) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"routing shard {shard} has metadata {key}={meta[key]!r}, expected a positive "
                f"integer: {_RERUN}"
            )
    return meta


def read_routing_meta(path_or_dir: str | Path) -> dict[str, object]:
    """Metadata shared by all shards: n_layers, top_k, n_experts (int), model (str), extras (str).

    Raises one ValueError naming the first disagreeing shard if shards come from different
    captures (model, shape or any non "shard_" extra key).
    """
    shards = routing_shards(path_or_dir)
    first = _shard_meta(shards[0])
    shared = {k: v for k, v in first.items() if not k.startswith(PER_SHARD_PREFIX)}
    for shard in shards[1:]:
        meta = _shard_meta(shard)
        keys = sorted(set(shared) | {k for k in meta if not k.startswith(PER_SHARD_PREFIX)})
        for key in keys:
            if meta.get(key) != shared.get(key):
                raise ValueError(
                    f"routing shard {shard.name} was written with {key}={meta.get(key)!r}, "
                    f"{shards[0].name} with {key}={shared.get(key)!r}: shards come from different "
                    f"captures; {_RERUN}"
                )
    n_layers, top_k, n_experts = (int(shared[k]) for k in _INT_KEYS)
    if top_k > n_experts:
        raise ValueError(
            f"routing metadata top_k={top_k} > n_experts={n_experts} in {path_or_dir}: {_RERUN}"
        )
    out: dict[str, object] = dict(shared)
    out.update({META_N_LAYERS: n_layers, META_TOP_K: top_k, META_N_EXPERTS: n_experts})
    return out


def check_columns(path_or_dir: str | Path, columns: Sequence[str]) -> None:
    """Raise a ValueError naming the first shard lacking one of `columns`."""
    for shard in routing_shards(path_or_dir):
        names = set(pq.read_schema(shard).names)
        for col in columns:
            if col not in names:
                raise ValueError(
                    f"routing shard {shard} has no column {col!r} (has {sorted(names)}): it does "
                    f"not follow the routing contract; {_RERUN}"
                )


def iter_routing_shard_batches(
    path_or_dir: str | Path,
    columns: Sequence[str],
    batch_rows: int = 16384,
    progress: bool = False,
) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """Yield (shard, batch) with at most `batch_rows` rows, reading only `columns`.

    Memory stays bounded by one row group plus one batch whatever the total size. Columns are
    checked in every shard before the first batch is yielded, so a bad shard fails early.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    shards = routing_shards(path_or_dir)
    check_columns(path_or_dir, columns)
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="routing shards", unit="shard")
    for shard in shards:
        with pq.ParquetFile(shard) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
                yield shard, batch


def iter_routing_batches(
    path_or_dir: str | Path,
    columns: Sequence[str],
    batch_rows: int = 16384,
    progress: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the routing shards (see iter_routing_shard_batches)."""
    for _, batch in iter_routing_shard_batches(path_or_dir, columns, batch_rows, progress):
        yield batch
