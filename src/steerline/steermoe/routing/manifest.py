"""The manifest of a routing capture (manifest.json): what a finished capture published.

capture_routing writes the generations file, then the routing directory, renamed into place in
one step with manifest.json written last inside it: a directory without a manifest, or whose
files disagree with it, is not a finished capture. The manifest names the generations file of
the same capture with its SHA-256, so a kill between the two writes is caught by
read_generations. Readers (routing.reader: routing_shards, read_routing_meta) verify it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from steerline.core.errors import UserError
from steerline.steermoe.routing.schema import (
    INT_KEYS,
    PER_SHARD_PREFIX,
    RERUN,
    shard_meta,
    shared_meta,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "steerline.routing_manifest.v1"


def shard_files(directory: Path) -> list[Path]:
    """The shard files present in a routing directory, sorted by name."""
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
    shards = shard_files(root)
    if not shards:
        raise ValueError(f"no routing shards (*.parquet) in {root} to list in a manifest")
    meta = shared_meta(shards, root)
    shape = {k: int(meta[k]) for k in INT_KEYS}
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
    return ValueError(f"{path}: {what}; {RERUN}")


def read_routing_manifest(routing_dir: str | Path) -> dict:
    """The manifest of a routing directory, with the files present checked against it (every
    listed file present with its size, nothing unlisted). Cheap: no file is read or hashed."""
    import json

    root = Path(routing_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: capture_routing writes it last, so {root} is not a finished "
            f"capture (killed, copied in part, or written by an older version); {RERUN}"
        )
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(shards, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise _bad(path, f"not a routing manifest ({MANIFEST_FORMAT})") from None
    listed = [str(e["file"]) for e in shards]
    present = {f.name for f in shard_files(root)}
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
        meta = shard_meta(shard)
        for key in sorted(set(shared) | {k for k in meta if not k.startswith(PER_SHARD_PREFIX)}):
            if key.startswith(PER_SHARD_PREFIX):
                continue
            if meta.get(key) != shared.get(key):
                raise _bad(shard, f"was written with {key}={meta.get(key)!r} but the capture "
                                  f"in manifest.json has {key}={shared.get(key)!r}: a shard "
                                  "from another capture")
        for key in INT_KEYS:
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
                            f"per prompt expected); {RERUN}")
    return gens
