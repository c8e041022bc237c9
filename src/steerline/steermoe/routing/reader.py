"""Checked streaming reads of a routing directory (or a single shard): its shards as its
manifest lists them, their shared metadata, and record batches of chosen columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from steerline.steermoe.routing.manifest import read_routing_manifest, shard_files, verify_routing
from steerline.steermoe.routing.schema import INT_KEYS, RERUN, shared_meta


def routing_shards(routing_dir: str | Path) -> list[Path]:
    """The shard files of a routing directory (or a single shard file), sorted by name.

    A directory must hold a manifest.json that lists exactly its shards, with their sizes
    (read_routing_manifest); read_routing_meta checks their content too."""
    path = Path(routing_dir)
    if path.is_file():
        return [path]
    if not path.is_dir() or not shard_files(path):
        raise ValueError(
            f"no routing shards (*.parquet) in {path}: run capture_routing first "
            "(dvc repro capture_routing)"
        )
    manifest = read_routing_manifest(path)
    return [path / str(e["file"]) for e in manifest["shards"]]


def read_routing_meta(path_or_dir: str | Path, check_hashes: bool = True) -> dict[str, object]:
    """Metadata shared by all shards: n_layers, top_k, n_experts (int), model (str), extras (str).

    A directory is verified against its manifest first (verify_routing: every listed shard
    present and unchanged, none extra, same capture, shape = the captured model's config).
    Raises one ValueError naming the first disagreeing shard if shards come from different
    captures (model, shape or any non "shard_" extra key). `check_hashes=False` leaves out only
    the SHA-256 pass (a caller that runs verify_routing_hashes itself, e.g. beside its reads).
    """
    if Path(path_or_dir).is_dir():
        verify_routing(path_or_dir, check_hashes)
    shards = routing_shards(path_or_dir)
    shared = shared_meta(shards, path_or_dir)
    out: dict[str, object] = dict(shared)
    out.update({k: int(shared[k]) for k in INT_KEYS})
    return out


def check_columns(path_or_dir: str | Path, columns: Sequence[str]) -> None:
    """Raise a ValueError naming the first shard lacking one of `columns`."""
    for shard in routing_shards(path_or_dir):
        names = set(pq.read_schema(shard).names)
        for col in columns:
            if col not in names:
                raise ValueError(
                    f"routing shard {shard} has no column {col!r} (has {sorted(names)}): it does "
                    f"not follow the routing contract; {RERUN}"
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
