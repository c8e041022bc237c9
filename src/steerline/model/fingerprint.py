"""Content fingerprint of a model directory: SHA-256 over every file's name and bytes.

Every byte counts (weights included), so two models that differ anywhere get different
fingerprints; it keys the capture cache and the fine-tuning checkpoints and is recorded in the
routing metadata and manifest. Hashing streams each file; the per-file digests are cached in a
small JSON file keyed by the resolved path, size, mtime, ctime and inode, so a rerun on the same
files reads nothing. ctime cannot be set from user space: a file rewritten in place (even with
its size and mtime restored) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from steerline.core.io import sha256_file, write_json

FINGERPRINT_CACHE = Path("tmp/model_fingerprints.json")  # git-ignored; safe to delete


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _model_files(root: Path) -> list[Path]:
    """Every regular file of the directory tree (hidden entries, e.g. temporaries, left out)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def model_fingerprint(model_path: str | Path, cache: str | Path | None = FINGERPRINT_CACHE
                      ) -> str:
    """16 hex digits of SHA-256 over (relative name, SHA-256 of bytes) of every file under
    `model_path`. `cache`: the per-file digest cache (None: hash everything)."""
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} not found: run the build_models stage "
                                "or point the params at a local checkpoint")
    entries: dict[str, dict[str, str]] = {}
    if cache is not None and Path(cache).is_file():
        try:
            entries = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            entries = {}  # an unreadable cache is only a cache
    changed = False
    h = hashlib.sha256()
    for f in _model_files(root):
        key, stat = str(f.resolve()), _stat_key(f)
        hit = entries.get(key)
        if hit is None or hit.get("stat") != stat:
            hit = {"stat": stat, "sha256": sha256_file(f)}
            entries[key] = hit
            changed = True
        h.update(f"{f.relative_to(root).as_posix()}\0{hit['sha256']}\n".encode())
    if cache is not None and changed:
        live = {k: v for k, v in entries.items() if Path(k).exists()}
        write_json(dict(sorted(live.items())), cache)
    return h.hexdigest()[:16]
