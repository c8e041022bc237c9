"""The routing artifact's contract (data/routing/*.parquet): the columns of a shard, its required
metadata, and the checks of one shard's metadata and of several shards' agreement.

One row per token; `experts` / `weights` hold n_layers * top_k entries, layer-major (the top_k
expert ids of layer 0, then layer 1, ...). Shards are written by capture_routing and read by
risk_diff; both import the names below so the contract lives in one place (docs: DESIGN.md). The
capture's manifest: routing.manifest; checked streaming reads: routing.reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
INT_KEYS = (META_N_LAYERS, META_TOP_K, META_N_EXPERTS)  # the shape: positive integers
# Extra keys with this prefix may differ between shards (e.g. shard_index); all others must agree.
PER_SHARD_PREFIX = "shard_"

# the fix every routing error names
RERUN = "delete data/routing and rerun capture_routing (dvc repro capture_routing)"


def moe_layers_of(meta: dict) -> list[int]:
    """The model's own layer number of each of the n_layers routed blocks (older captures
    without the key: 0..n_layers-1)."""
    n_layers = int(meta[META_N_LAYERS])
    raw = meta.get(META_MOE_LAYERS)
    layers = list(range(n_layers)) if raw is None else [int(x) for x in json.loads(str(raw))]
    if len(layers) != n_layers or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"routing metadata moe_layers={raw!r} must list {n_layers} increasing "
                         f"layer numbers: {RERUN}")
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


def shard_meta(shard: Path) -> dict[str, str]:
    """One shard's key-value metadata (the pandas key left out), checked: every META_KEYS key
    present, n_layers, top_k and n_experts positive integers."""
    try:
        raw = pq.read_schema(shard).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"routing shard {shard} is not a readable Parquet file ({err}): "
                         f"{RERUN}") from None
    meta = {k.decode(): v.decode() for k, v in raw.items() if k != b"pandas"}
    for key in META_KEYS:
        if key not in meta:
            raise ValueError(
                f"routing shard {shard} lacks metadata key {key!r} (needs {list(META_KEYS)}): "
                f"{RERUN}"
            )
    for key in INT_KEYS:
        try:
            ok = int(meta[key]) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"routing shard {shard} has metadata {key}={meta[key]!r}, expected a positive "
                f"integer: {RERUN}"
            )
    return meta


def shared_meta(shards: Sequence[Path], where: str | Path) -> dict[str, str]:
    """Metadata every shard agrees on (keys starting with "shard_" left out); one ValueError
    naming the first disagreeing shard otherwise."""
    first = shard_meta(shards[0])
    shared = {k: v for k, v in first.items() if not k.startswith(PER_SHARD_PREFIX)}
    for shard in shards[1:]:
        meta = shard_meta(shard)
        keys = sorted(set(shared) | {k for k in meta if not k.startswith(PER_SHARD_PREFIX)})
        for key in keys:
            if meta.get(key) != shared.get(key):
                raise ValueError(
                    f"routing shard {shard.name} was written with {key}={meta.get(key)!r}, "
                    f"{shards[0].name} with {key}={shared.get(key)!r}: shards come from different "
                    f"captures; {RERUN}"
                )
    if int(shared[META_TOP_K]) > int(shared[META_N_EXPERTS]):
        raise ValueError(
            f"routing metadata top_k={shared[META_TOP_K]} > n_experts={shared[META_N_EXPERTS]} "
            f"in {where}: {RERUN}"
        )
    return shared
