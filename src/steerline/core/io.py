"""Atomic writers for every artifact format the pipeline uses (no pickle anywhere).

Each writer goes to a temporary sibling and renames it into place, so a killed stage never
leaves a half-written file that a later stage (or DVC) could mistake for a result. A stage with
several outputs writes them all inside `staged_outputs()`: every temporary first, the renames
last, so a failure (a full disk) leaves all of the previous outputs as they were. An OSError
while writing is one UserError naming the output (errors.run_stage prints it on one line).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from steerline.core.errors import UserError

# Published artifacts are world-readable whatever the process umask or the writing library
# (mkstemp and some writers create 0600 files): files 0644, directories 0755.
FILE_MODE = 0o644
DIR_MODE = 0o755
_TMP_SUFFIX = ".tmp"
# Temporaries handed out by staged_outputs: atomic_path / atomic_dir write them in place (they
# are already private to this process, and staged_outputs renames them onto their outputs).
_STAGED: set[Path] = set()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: past any pid
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries a killed writer left beside `path` (`.<name>.<pid>.*.tmp` whose
    process is gone, and names without a pid from older versions); returns what was removed.
    Temporaries of live processes are kept (a concurrent writer is not disturbed)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for cand in path.parent.iterdir():
        name = cand.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        # .<name>.<pid>.<random>.tmp, or .<name>.<random>.tmp (older); mkstemp's random part
        # has no dot, so a temporary of another file ("<name>.<more>") never matches
        parts = name[len(prefix):-len(_TMP_SUFFIX)].split(".")
        if len(parts) == 2 and parts[0].isdigit():
            if pid_alive(int(parts[0])):
                continue
        elif len(parts) != 1:
            continue
        if cand.is_dir() and not cand.is_symlink():
            shutil.rmtree(cand, ignore_errors=True)
        else:
            cand.unlink(missing_ok=True)
        removed.append(cand)
    return removed


def publish_modes(root: str | Path) -> None:
    """chmod a file, or a directory tree, to the published modes (files 0644, dirs 0755)."""
    root = Path(root)
    if not root.is_dir():
        os.chmod(root, FILE_MODE)
        return
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), DIR_MODE)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), FILE_MODE)


def write_error(err: OSError, path: str | Path) -> UserError:
    """An OSError raised while writing `path` as one user error naming the path and the fix."""
    text = err.strerror or str(err) or type(err).__name__
    full = err.errno == errno.ENOSPC or "No space left" in str(err)
    fix = ("free space on that disk" if full
           else "check that the folder exists, is writable and is not full")
    return UserError(f"cannot write {path}: {text}: {fix}, then rerun (the previous outputs "
                     "are left as they were)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    Temporaries left beside `path` by a killed earlier run are removed first. An OSError of the
    block or the rename is a UserError naming `path`."""
    path = Path(path)
    if path in _STAGED:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish_modes(tmp_path)
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise write_error(err, path) from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds.
    Temporaries left beside `path` by a killed earlier run are removed first; every file of the
    published tree gets the published modes."""
    path = Path(path)
    if path in _STAGED:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX,
                                dir=path.parent))
    try:
        yield tmp
        publish_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Staging:
    """The temporaries of one staged_outputs block: `staging(out)` for a file, `.dir(out)` for
    a directory; each returns the temporary to write (the writers of this module write it in
    place)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []  # (temporary, output), in order
        self.current: Path | None = None  # the output being written (named by an OSError)

    def _new(self, target: str | Path, directory: bool) -> Path:
        target = Path(target)
        self.current = target
        if any(t == target for _, t in self.pairs):
            raise ValueError(f"{target} is staged twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        prefix, where = f".{target.name}.{os.getpid()}.", target.parent
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=where))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=where)
            os.close(fd)
            tmp = Path(name)
        self.pairs.append((tmp, target))
        _STAGED.add(tmp)
        return tmp

    def __call__(self, target: str | Path) -> Path:
        return self._new(target, directory=False)

    def dir(self, target: str | Path) -> Path:
        return self._new(target, directory=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_outputs() -> Iterator[Staging]:
    """All of a stage's outputs or none of them: the block writes every output to its
    temporary (`staging(path)`, `staging.dir(path)`); only when all are written are they
    renamed onto the outputs, one rename each. A failure in the block (a full disk, a bug)
    removes the temporaries and leaves every previous output untouched; an OSError becomes one
    UserError naming the output being written."""
    staging = Staging()
    backups: list[tuple[Path, Path]] = []  # (old directory moved aside, its output)
    try:
        try:
            yield staging
        except OSError as err:
            raise write_error(err, staging.current or "an output") from err
        for tmp, _ in staging.pairs:
            publish_modes(tmp)
        for tmp, target in staging.pairs:
            try:
                if tmp.is_dir() and target.exists():
                    # a directory cannot be renamed over a non-empty one: the old one is moved
                    # aside first and deleted once every output is in place
                    aside = target.with_name(f".{target.name}.{os.getpid()}.old{_TMP_SUFFIX}")
                    _remove(aside)
                    os.replace(target, aside)
                    backups.append((aside, target))
                os.replace(tmp, target)
            except OSError as err:
                raise write_error(err, target) from err
    except BaseException:
        for aside, target in backups:  # put back any old directory not yet replaced
            if not target.exists():
                os.replace(aside, target)
        raise
    finally:
        for tmp, _ in staging.pairs:
            _STAGED.discard(tmp)
            _remove(tmp)
        for aside, _ in backups:
            _remove(aside)


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(table: pa.Table, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a Parquet file atomically, merging `metadata` into its key-value metadata."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_parquet(df: Any, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a pandas DataFrame to Parquet atomically (index dropped)."""
    write_table(pa.Table.from_pandas(df, preserve_index=False), path, metadata)


def parquet_metadata(path: str | Path) -> dict[str, str]:
    """The user key-value metadata of a Parquet file (pandas' own key left out)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k != b"pandas"}


def write_npy(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def read_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def save_safetensors(tensors: dict[str, Any], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """torch tensors -> a safetensors file, atomically, with a byte-reproducible header.

    safetensors serializes its metadata map in hash order (a different file on every run for
    more than one key); the header is rewritten here with every key sorted. Offsets are
    relative to the data section, so the tensor bytes stay as they are."""
    from safetensors.torch import save

    blob = save({k: tensors[k] for k in sorted(tensors)}, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format's 8-byte alignment of the data section
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            f.write(memoryview(blob)[8 + n:])


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


TIMINGS_DIR = Path("reports/timings")  # git-ignored, not a DVC output: wall-clock figures only


def write_timings(stage: str, seconds: dict[str, float], directory: str | Path = TIMINGS_DIR
                  ) -> None:
    """Wall-clock figures of a stage run, kept out of every DVC output and metrics file (they
    differ on every run)."""
    write_json({k: round(float(v), 2) for k, v in seconds.items()},
               Path(directory) / f"{stage}.json")
