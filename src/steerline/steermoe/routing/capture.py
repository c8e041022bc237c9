"""capture_routing's work: prompts -> greedy answers + per-token routing, sharded and resumable.

Any backend (steerline.backends: vLLM by default, transformers as the reference) does the
generation; finished shards are kept in a cache directory keyed by the model's content
fingerprint, the backend, the prompts and the params, so a killed run resumes where it stopped
and produces the same bytes; the outputs are published once every shard is done, the routing
directory last (its manifest.json names the generations file and its SHA-256).

Captures may share one cache folder: each holds an flock on its own entry's lock file for as
long as it runs, and removes only the entries of other keys that no running capture holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.backends import Backend
from steerline.core.chat import TargetChat, render_chat, render_target_chat
from steerline.core.errors import UserError
from steerline.core.faults import kill_point
from steerline.core.io import atomic_dir, write_parquet
from steerline.model.arch import DenseModelError
from steerline.steering.capture import check_context
from steerline.steermoe.data.safety import check_prompt_texts, validate_prompts
from steerline.steermoe.routing.capture_dp import CapturePool
from steerline.steermoe.routing.manifest import write_routing_manifest
from steerline.steermoe.routing.reader import routing_shards
from steerline.steermoe.routing.schema import META_TARGET, routing_metadata
from steerline.steermoe.routing.shard import capture_shard, shard_done


@dataclass(frozen=True)
class CaptureConfig:
    max_new_tokens: int
    shard_prompts: int  # prompts per shard, each shard one backend call (vLLM: all in flight)


def run_capture(
    backend: Backend | CapturePool,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    cfg: CaptureConfig,
    routing_dir: Path,
    generations_path: Path,
    cache_dir: Path,
    meta: dict[str, str],
) -> pd.DataFrame:
    """Capture every prompt, shard by shard (resuming from `cache_dir`), then publish:
    `generations_path` first, then `routing_dir` in one rename (the shards and manifest.json,
    which records the generations' SHA-256: the pair is verified by read_generations, and the
    manifest is the capture's commit point). The shards' metadata records `backend` (the
    backend's name) besides `meta`, which must hold `model` and `model_fingerprint`
    (steerline.model.fingerprint: it keys the cache, so a changed model never reuses a shard).
    Cache entries of other keys are removed unless another capture holds them. A
    `CapturePool` backend captures the pending shards in its processes (data parallel),
    byte-identical to one backend."""
    if not backend.n_layers:
        raise DenseModelError("routing capture needs a Mixture-of-Experts model; the backend "
                              "loaded a dense one")
    if not meta.get("model_fingerprint"):
        raise ValueError("capture metadata needs model_fingerprint (the model's content hash): "
                         "it keys the capture cache")
    check_prompt_texts(prompts, "capture_routing prompts")
    validate_prompts(prompts, "capture_routing prompts")
    prompts = prompts.sort_values("prompt_id").reset_index(drop=True)
    # paired-chat rows (a `messages` column: steermoe.data.paired_chat) run teacher-forced
    paired = "messages" in prompts.columns and bool(prompts["messages"].notna().any())
    if not paired:
        chats = [render_chat(tokenizer, t) for t in prompts["text"]]
    else:
        chats = [render_chat(tokenizer, t) if not isinstance(m, str) else
                 _target_chat(tokenizer, pid, m, tgt) for pid, t, m, tgt in zip(
                     prompts["prompt_id"], prompts["text"], prompts["messages"],
                     prompts["target"], strict=True)]
    ids, labels = prompts["prompt_id"].tolist(), prompts["label"].tolist()
    if not paired:
        check_context(chats, ids, cfg.max_new_tokens, backend.max_context)
    else:  # a teacher-forced chat generates nothing: its own length is what must fit
        for c, pid in zip(chats, ids, strict=True):
            check_context([c], [pid], 0 if isinstance(c, TargetChat) else cfg.max_new_tokens,
                          backend.max_context)
    shard_meta = routing_metadata(backend.n_layers, backend.top_k, backend.n_experts,
                                  **{**meta, "backend": backend.name,
                                     "moe_layers": json.dumps(list(backend.moe_layers))})
    if getattr(backend, "native", False):  # vLLM's own capture returns no routing weights
        shard_meta["weights"] = "absent"
    if paired:  # every shard gets the is_target column (capture_shard), and says so
        shard_meta[META_TARGET] = "1"
    keyed = [shard_meta, cfg.__dict__, ids, prompts["text"].tolist(), labels]
    if paired:  # the chats and targets are the prompts of those rows (their text is a part)
        keyed += [prompts["messages"].tolist(), prompts["target"].tolist()]
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
    with _cache_entry(cache_dir, key) as work:
        starts = list(range(0, len(chats), cfg.shard_prompts))
        # the others were captured by an earlier run
        pending = [k for k in range(len(starts)) if not shard_done(work, k)]
        spans = {k: slice(starts[k], starts[k] + cfg.shard_prompts) for k in pending}
        if isinstance(backend, CapturePool):  # data parallel: the same shards, n processes
            backend.capture_shards([{"k": k, "chats": chats[sl], "ids": ids[sl],
                                     "labels": labels[sl]} for k, sl in spans.items()],
                                   work, shard_meta, cfg.max_new_tokens)
        else:
            for k, sl in tqdm(spans.items(), desc="capture shards"):
                capture_shard(backend, tokenizer, chats[sl], ids[sl], labels[sl],
                              cfg.max_new_tokens, shard_meta, work, k)
                kill_point(f"capture:shard:{k}")
        generations = pd.concat(
            [pd.read_parquet(work / f"gen-{k:05d}.parquet") for k in range(len(starts))],
            ignore_index=True,
        )
        model_config = {"n_layers": backend.n_layers, "top_k": backend.top_k,
                        "n_experts": backend.n_experts}
        write_parquet(generations, generations_path)
        kill_point("capture:publish")
        with atomic_dir(routing_dir) as tmp:
            for k in range(len(starts)):
                shutil.copyfile(work / f"shard-{k:05d}.parquet", tmp / f"shard-{k:05d}.parquet")
            write_routing_manifest(tmp, model_config, generations_path)  # last: the commit point
    return generations


# In each cache entry: the file a capture holds an exclusive flock on while it uses the entry
# (the kernel drops the lock when the process dies, so a killed capture's entry is free).
LOCK = ".lock"


def _lock(entry: Path, wait: bool) -> int | None:
    """A descriptor holding the flock of entry/.lock, or None: held by another capture (with
    `wait` False), or the entry removed or replaced between the open and the lock (the file
    locked is then no longer entry/.lock, and holding it protects nothing)."""
    try:
        fd = os.open(entry / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the entry was removed after the caller saw it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.stat(entry / LOCK), os.fstat(fd)):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _claim(work: Path) -> int:
    """Create the cache entry `work` and hold its lock (waiting while a capture of the same
    key holds it); returns the lock's descriptor."""
    while True:
        work.mkdir(parents=True, exist_ok=True)
        fd = _lock(work, wait=True)
        if fd is not None:
            return fd


@contextlib.contextmanager
def _cache_entry(cache_dir: Path, key: str) -> Iterator[Path]:
    """The cache entry of `key`, locked for the block (entries of other keys that no capture
    holds are deleted first); deleted when the block succeeds, kept for a resume otherwise."""
    work = cache_dir / key
    lock = _claim(work)
    try:
        _remove_unused(cache_dir, key)
        yield work
        _discard(work)
    finally:
        os.close(lock)  # releases the flock


def _discard(entry: Path) -> None:
    """Delete a cache entry whose lock the caller holds. It is renamed away first: a capture
    claiming its key meanwhile then makes a new entry instead of reading shards being deleted."""
    trash = Path(tempfile.mkdtemp(prefix=".removing-", dir=entry.parent))
    try:
        os.rename(entry, trash / entry.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_unused(cache_dir: Path, key: str) -> None:
    """Delete the entries of other keys (older params, prompts or models, and what a killed
    cleanup left), except those another running capture holds."""
    for entry in sorted(cache_dir.iterdir()):
        if entry.name == key:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
            continue
        fd = _lock(entry, wait=False)
        if fd is None:
            continue
        try:
            _discard(entry)
        finally:
            os.close(fd)


def _target_chat(tokenizer: PreTrainedTokenizerBase, prompt_id: str, messages: str,
                 target: object) -> TargetChat:
    """A paired-chat row's TargetChat; a chat the template cannot place names its prompt."""
    try:
        chat = json.loads(messages)
    except json.JSONDecodeError as err:
        raise UserError(f"prompt {prompt_id!r}: its messages are not a JSON chat ({err.msg}): "
                        "rebuild the prompt table (prepare_safety)") from None
    if not isinstance(target, str):
        raise UserError(f"prompt {prompt_id!r} has a chat but no target: rebuild the prompt "
                        "table (prepare_safety)")
    try:
        return render_target_chat(tokenizer, chat, target)
    except UserError as err:
        raise UserError(f"prompt {prompt_id!r}: {err}") from None


def routing_store_bytes(routing_dir: Path) -> int:
    return sum(f.stat().st_size for f in routing_shards(routing_dir))


def routing_rows(routing_dir: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in routing_shards(routing_dir))
