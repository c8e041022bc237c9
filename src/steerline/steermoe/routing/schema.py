"""The routing artifact (data/routing/*.parquet): schema, metadata, checked streaming reads.

One row per token; `experts` / `weights` hold n_layers * top_k entries, layer-major (the top_k
expert ids of layer 0, then layer 1, ...). Shards are written by capture_routing and read by
risk_diff; both import the names below so the contract lives in one place (docs: DESIGN.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steerline.core.errors import UserError

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
#: a capture of paired-chat prompts (steermoe.data.paired_chat) adds one column: True on the
#: tokens of each chat's target span (risk_diff's `target` scope). Other captures lack it, so
#: their shards keep the schema above, byte for byte.
TARGET_FIELD = pa.field("is_target", pa.bool_())
ROUTING_SCHEMA_TARGET = ROUTING_SCHEMA.append(TARGET_FIELD)
#: shard metadata key of such a capture ("1"): every shard of it has the is_target column
META_TARGET = "target_spans"
LABELS = ("safe", "unsafe")
# Required Parquet key-value metadata of every shard; values are strings on disk.
META_N_LAYERS = "n_layers"
META_TOP_K = "top_k"
META_N_EXPERTS = "n_experts"
META_MODEL = "model"
# JSON list: the decoder-layer index of each routed block (models with dense layers skip some)
META_MOE_LAYERS = "moe_layers"
META_KEYS = (META_N_LAYERS, META_TOP_K, META_N_EXPERTS, META_MODEL)
_INT_KEYS = (META_N_LAYERS, META_TOP_K, META_N_EXPERTS)
# Extra keys with this prefix may differ between shards (e.g. shard_index); all others must agree.
PER_SHARD_PREFIX = "shard_"

_RERUN = "delete data/routing and rerun capture_routing (dvc repro capture_routing)"


def moe_layers_of(meta: dict) -> list[int]:
    """The model's own layer number of each of the n_layers routed blocks (older captures
    without the key: 0..n_layers-1)."""
    n_layers = int(meta[META_N_LAYERS])
    raw = meta.get(META_MOE_LAYERS)
    layers = list(range(n_layers)) if raw is None else [int(x) for x in json.loads(str(raw))]
    if len(layers) != n_layers or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"routing metadata moe_layers={raw!r} must list {n_layers} increasing "
                         f"layer numbers: {_RERUN}")
    return layers


def routing_metadata(
    n_layers: int, top_k: int, n_experts: int, model: str, **extra: object
) -> dict[str, str]:
    """Key-value metadata for one routing shard (pass it to steerline.core.io.write_table).

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
    is_target: np.ndarray | None = None,
) -> pa.Table:
    """Build a ROUTING_SCHEMA table from per-token arrays; experts/weights are [N, n_layers*top_k].
    With `is_target` (a paired-chat capture), a ROUTING_SCHEMA_TARGET table.

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
    if is_target is None:
        return pa.Table.from_arrays(columns, schema=ROUTING_SCHEMA)
    columns.append(pa.array(np.asarray(is_target, dtype=bool)))
    return pa.Table.from_arrays(columns, schema=ROUTING_SCHEMA_TARGET)


def routing_shards(routing_dir: str | Path) -> list[Path]:
    """The shard files of a routing directory (or a single shard file), sorted by name.

    A directory must hold a manifest.json that lists exactly its shards, with their sizes
    (read_routing_manifest); read_routing_meta checks their content too."""
    path = Path(routing_dir)
    if path.is_file():
        return [path]
    if not path.is_dir() or not _shard_files(path):
        raise ValueError(
            f"no routing shards (*.parquet) in {path}: run capture_routing first "
            "(dvc repro capture_routing)"
        )
    manifest = read_routing_manifest(path)
    return [path / str(e["file"]) for e in manifest["shards"]]


def _shard_meta(shard: Path) -> dict[str, str]:
    try:
        raw = pq.read_schema(shard).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"routing shard {shard} is not a readable Parquet file ({err}): "
                         f"{_RERUN}") from None
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


def _shared_meta(shards: Sequence[Path], where: str | Path) -> dict[str, str]:
    """Metadata every shard agrees on (keys starting with "shard_" left out); one ValueError
    naming the first disagreeing shard otherwise."""
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
    if int(shared[META_TOP_K]) > int(shared[META_N_EXPERTS]):
        raise ValueError(
            f"routing metadata top_k={shared[META_TOP_K]} > n_experts={shared[META_N_EXPERTS]} "
            f"in {where}: {_RERUN}"
        )
    return shared


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
    shared = _shared_meta(shards, path_or_dir)
    out: dict[str, object] = dict(shared)
    out.update({k: int(shared[k]) for k in _INT_KEYS})
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


# ---- the manifest: what a finished capture published ----------------------------------------
# capture_routing writes the generations file, then the routing directory, renamed into place in
# one step with manifest.json written last inside it: a directory without a manifest, or whose
# files disagree with it, is not a finished capture. The manifest names the generations file of
# the same capture with its SHA-256, so a kill between the two writes is caught by
# read_generations. Readers (routing_shards, read_routing_meta) verify it.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "steerline.routing_manifest.v1"


def _shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.parquet"))


def _file_entry(path: Path, name: str | None = None) -> dict[str, object]:
    from steerline.core.io import sha256_file

    return {"file": name or path.name, "rows": int(pq.read_metadata(path).num_rows),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_routing_manifest(
    routing_dir: str | Path, model_config: dict[str, int] | None = None,
    generations: str | Path | None = None,
) -> dict[str, object]:
    """Write `routing_dir`/manifest.json describing its shards: file names, rows, bytes,
    SHA-256, prompt ids per shard, the capture's shared metadata (model, model_fingerprint,
    backend, ...), `model_config` (n_layers, top_k, n_experts of the model as loaded; default:
    the shards' own metadata) and the `generations` file published with them. Call it last."""
    root = Path(routing_dir)
    shards = _shard_files(root)
    if not shards:
        raise ValueError(f"no routing shards (*.parquet) in {root} to list in a manifest")
    meta = _shared_meta(shards, root)
    shape = {k: int(meta[k]) for k in _INT_KEYS}
    config = {k: int(v) for k, v in (model_config or shape).items()}
    entries = []
    for shard in shards:
        entry = _file_entry(shard)
        ids = pq.read_table(shard, columns=["prompt_id"]).column(0).unique().to_pylist()
        entry["prompt_ids"] = ids
        entries.append(entry)
    manifest = {
        "format": MANIFEST_FORMAT,
        "metadata": {k: meta[k] for k in sorted(meta)},
        "model_config": config,
        "n_shards": len(entries),
        "n_rows": sum(int(e["rows"]) for e in entries),
        "n_prompts": sum(len(e["prompt_ids"]) for e in entries),
        "shards": entries,
        "generations": (_file_entry(Path(generations), Path(generations).as_posix())
                        if generations is not None else None),
    }
    from steerline.core.io import write_json

    write_json(manifest, root / MANIFEST)
    return manifest


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; {_RERUN}")


def read_routing_manifest(routing_dir: str | Path) -> dict:
    """The manifest of a routing directory, with the files present checked against it (every
    listed file present with its size, nothing unlisted). Cheap: no file is read or hashed."""
    import json

    root = Path(routing_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: capture_routing writes it last, so {root} is not a finished "
            f"capture (killed, copied in part, or written by an older version); {_RERUN}"
        )
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(shards, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise _bad(path, f"not a routing manifest ({MANIFEST_FORMAT})") from None
    listed = [str(e["file"]) for e in shards]
    present = {f.name for f in _shard_files(root)}
    for name in listed:
        if name not in present:
            raise _bad(root / name, "listed in manifest.json but missing (deleted or never "
                                    "copied): the routing is incomplete")
    for name in sorted(present - set(listed)):
        raise _bad(root / name, "not listed in manifest.json: a shard from another capture "
                                "or a stray file; remove it or rerun the capture")
    for e in shards:
        f = root / str(e["file"])
        if not f.is_file():
            raise _bad(f, "listed in manifest.json but missing")
        if f.stat().st_size != int(e["bytes"]):
            raise _bad(f, f"has {f.stat().st_size} bytes, manifest.json says {e['bytes']} "
                          "(truncated or rewritten)")
    seen: dict[str, str] = {}
    for e in shards:
        for pid in e.get("prompt_ids", []):
            if pid in seen:
                raise _bad(path, f"prompt {pid!r} is listed in both {seen[pid]} and {e['file']}")
            seen[pid] = str(e["file"])
    return manifest


def verify_routing(routing_dir: str | Path, check_hashes: bool = True) -> dict:
    """Full check of a routing directory against its manifest: the listed files, their sizes
    and SHA-256, each shard's metadata equal to the manifest's (same model fingerprint, same
    capture) and the shape (n_layers, top_k, n_experts) equal to the model config recorded at
    capture. Returns the manifest; raises one ValueError naming the file and the fix.
    `check_hashes=False`: all but the SHA-256 pass (see verify_routing_hashes)."""
    root = Path(routing_dir)
    manifest = read_routing_manifest(root)
    shared = {str(k): str(v) for k, v in manifest.get("metadata", {}).items()}
    config = manifest.get("model_config") or {}
    for e in manifest["shards"]:
        shard = root / str(e["file"])
        meta = _shard_meta(shard)
        for key in sorted(set(shared) | {k for k in meta if not k.startswith(PER_SHARD_PREFIX)}):
            if key.startswith(PER_SHARD_PREFIX):
                continue
            if meta.get(key) != shared.get(key):
                raise _bad(shard, f"was written with {key}={meta.get(key)!r} but the capture "
                                  f"in manifest.json has {key}={shared.get(key)!r}: a shard "
                                  "from another capture")
        for key in _INT_KEYS:
            if key in config and int(meta[key]) != int(config[key]):
                raise _bad(shard, f"metadata says {key}={meta[key]} but the model captured "
                                  f"has {key}={config[key]} (manifest.json model_config)")
    if check_hashes:
        verify_routing_hashes(root, manifest)
    return manifest


def verify_routing_hashes(routing_dir: str | Path, manifest: dict | None = None) -> None:
    """Every listed shard's SHA-256 equals manifest.json's (the costly part of verify_routing:
    it reads every byte; hashlib releases the GIL, so a reader may run it in a thread beside
    its own reads). Raises one ValueError naming the first differing file."""
    from steerline.core.io import sha256_file

    root = Path(routing_dir)
    manifest = manifest or read_routing_manifest(root)
    for e in manifest["shards"]:
        f = root / str(e["file"])
        if sha256_file(f) != e["sha256"]:
            raise _bad(f, "content differs from manifest.json (modified after the capture, or "
                          "from another capture)")


def read_generations(generations_path: str | Path, routing_dir: str | Path):
    """The capture's greedy answers -> pandas DataFrame, checked to be the file published with
    the routing in `routing_dir` (its manifest records their SHA-256): a kill between the two
    writes, or files from two captures, is an error that says to rerun the capture."""
    import pandas as pd

    from steerline.core.io import sha256_file

    path = Path(generations_path)
    manifest = read_routing_manifest(routing_dir)
    entry = manifest.get("generations")
    if not entry:
        raise _bad(Path(routing_dir) / MANIFEST, "records no generations file")
    if not path.is_file():
        raise _bad(path, f"is missing (the capture in {routing_dir} wrote {entry['file']})")
    if sha256_file(path) != entry["sha256"]:
        raise _bad(path, f"is not the generations file of the capture in {routing_dir} "
                         "(its SHA-256 differs from manifest.json: a kill between the two "
                         "writes, or files from two captures)")
    gens = pd.read_parquet(path)
    # One answer per prompt: a repeated id (a file edited with its manifest, or two captures
    # merged) would make every per-prompt lookup return several rows.
    if "prompt_id" in gens.columns:
        ids = gens["prompt_id"].astype(str)
        dup = sorted(set(ids[ids.duplicated()]))
        if dup:
            more = f" and {len(dup) - 8} more" if len(dup) > 8 else ""
            raise UserError(f"{path}: prompt_id repeated: {', '.join(dup[:8])}{more} (one answer "
                            f"per prompt expected); {_RERUN}")
    return gens
