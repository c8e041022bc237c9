"""Data-parallel routing capture: N engine processes, each capturing whole shards.

`CapturePool(n, ...)` starts `n` worker processes (`python -m
steerline.steermoe.routing.capture_dp`), each with its own backend (`make_backend`: one vLLM
engine, or the transformers reference), and `run_capture` hands each of them a share of the pending
shards. Every shard is one `generate_and_capture` call over the same prompts as with a single
engine, written by the same code (`shard.capture_shard`), so the shards and generations are byte-
identical whatever `n`, and a killed run resumes shard by shard from the same cache (the cache key
leaves `n` out).

Why not vLLM's own data parallelism: vLLM 0.32's offline `LLM(data_parallel_size > 1)` refuses
to run in one process, and its multi-process SPMD mode (VLLM_DP_RANK / VLLM_DP_SIZE per process)
runs the ranks of an MoE model in lockstep (every MoE layer gathers all ranks' tokens, idle
ranks run dummy batches), so a shard's batches, hence its float results, would depend on what
the other ranks run at the same moment. Independent engines keep each shard's computation
exactly what it is with one engine.

Protocol (plain JSON lines, no pickle): each worker reports on its own pipe (fd passed on the
command line, so engine logs on stdout/stderr stay free) `{"info": {...}}` once its engine is
loaded; the parent checks all ranks load the same model, sends each worker one job on stdin
(its shards' token ids), and each worker reports `{"done": k}` after writing shard k (atomic
writes into the cache directory) and `{"finished": true}` at the end. On a GPU each rank sees
its own `tensor_parallel_size` devices (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from steerline.core.chat import ChatPrompt, TargetChat
from steerline.steermoe.routing.shard import capture_shard

INFO_KEYS = ("name", "n_layers", "moe_layers", "top_k", "n_experts", "max_context", "native")


class CaptureWorkerError(RuntimeError):
    """A capture worker process failed (its own log, above the error, says why)."""


def split_devices(n_ranks: int, per_rank: int, visible: str | None,
                  n_devices: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each rank: consecutive groups of `per_rank` devices taken from
    the caller's visible list (or 0..n_devices-1)."""
    devices = visible.split(",") if visible else [str(i) for i in range(n_devices)]
    need = n_ranks * per_rank
    if len(devices) < need:
        raise ValueError(f"data_parallel_size={n_ranks} x tensor_parallel_size={per_rank} needs "
                         f"{need} GPUs, {len(devices)} visible: lower capture_routing."
                         "data_parallel_size")
    return [",".join(devices[r * per_rank:(r + 1) * per_rank]) for r in range(n_ranks)]


class _Worker:
    def __init__(self, rank: int, proc: subprocess.Popen, report: Any) -> None:
        self.rank, self.proc, self.report = rank, proc, report
        self.buf = b""
        self.info: dict[str, Any] | None = None
        self.finished = False

    def lines(self) -> list[dict[str, Any]] | None:
        """Complete report lines available now; None at end of file (the worker exited)."""
        chunk = os.read(self.report.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in done if x.strip()]


class CapturePool:
    """`n` capture processes behind the attributes `run_capture` reads from a Backend
    (name, n_layers, moe_layers, top_k, n_experts, max_context). Use as a context manager."""

    def __init__(self, n: int, backend: str, model: str, dtype: str, batch_size: int = 16,
                 options: dict[str, Any] | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if n < 2:
            raise ValueError(f"CapturePool needs at least 2 processes, got {n}")
        self.model, self.progress = str(model), progress
        spec = {"backend": backend, "model": self.model, "dtype": dtype,
                "batch_size": int(batch_size), "options": options or {}, "seed": int(seed)}
        devices: list[str | None] = [None] * n
        if backend == "vllm":
            import torch

            if torch.cuda.is_available():
                tp = int((options or {}).get("tensor_parallel_size") or 1)
                devices = list(split_devices(n, tp, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                             torch.cuda.device_count()))
        self.workers: list[_Worker] = []
        try:
            for rank in range(n):
                self.workers.append(self._start(rank, spec, devices[rank]))
            self._wait_info()
        except BaseException:
            self.close()
            raise
        info = self.workers[0].info
        assert info is not None
        self.name = str(info["name"])
        self.n_layers, self.top_k = int(info["n_layers"]), int(info["top_k"])
        self.moe_layers = tuple(int(x) for x in info["moe_layers"])
        self.n_experts, self.max_context = int(info["n_experts"]), int(info["max_context"])
        self.native = bool(info["native"])  # vLLM's own routing capture (no weights)

    def _start(self, rank: int, spec: dict[str, Any], devices: str | None) -> _Worker:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "steerline.steermoe.routing.capture_dp",
                 "--report-fd", str(write_fd), "--rank", str(rank), "--spec", json.dumps(spec)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
        finally:
            os.close(write_fd)  # the child holds its copy: EOF here means the child is gone
        return _Worker(rank, proc, os.fdopen(read_fd, "rb", buffering=0))

    def _events(self, pending: list[_Worker]) -> Any:
        """(worker, message) pairs as they arrive; raises when a worker exits early."""
        sel = selectors.DefaultSelector()
        for w in pending:
            sel.register(w.report, selectors.EVENT_READ, w)
        try:
            while sel.get_map():
                for key, _ in sel.select():
                    w: _Worker = key.data
                    msgs = w.lines()
                    if msgs is None:
                        sel.unregister(w.report)
                        rc = w.proc.wait()
                        if not w.finished:
                            raise CaptureWorkerError(
                                f"capture process {w.rank} of {len(self.workers)} exited with "
                                f"code {rc} before finishing (its log is above)")
                        continue
                    for m in msgs:
                        yield w, m
        finally:
            sel.close()

    def _wait_info(self) -> None:
        waiting = set(range(len(self.workers)))
        for w, m in self._events(self.workers):
            if "info" in m:
                w.info = m["info"]
                waiting.discard(w.rank)
                if not waiting:
                    break
        first = {k: self.workers[0].info[k] for k in INFO_KEYS}
        for w in self.workers[1:]:
            if {k: w.info[k] for k in INFO_KEYS} != first:
                raise CaptureWorkerError(f"capture processes 0 and {w.rank} loaded different "
                                         f"models: {first} vs {w.info}")

    def capture_shards(self, shards: Sequence[dict[str, Any]], work: Path,
                       shard_meta: dict[str, str], max_new_tokens: int) -> None:
        """Capture `shards` (each {"k", "chats": [ChatPrompt], "ids", "labels"}) into `work`:
        shard i goes to process i mod n, so the split is fixed by the pending list alone."""
        n = len(self.workers)
        for w in self.workers:
            mine = [{"k": s["k"], "ids": s["ids"], "labels": s["labels"],
                     "chats": [[c.ids, c.is_template, *([c.is_target] if isinstance(
                         c, TargetChat) else [])] for c in s["chats"]]}
                    for s in shards[w.rank::n]]
            # absolute: a worker's working directory is the parent's when it started
            job = {"work": str(work.resolve()), "meta": shard_meta,
                   "max_new_tokens": int(max_new_tokens), "shards": mine}
            assert w.proc.stdin is not None
            try:
                w.proc.stdin.write(json.dumps(job).encode())
                w.proc.stdin.close()
            except BrokenPipeError:
                pass  # the worker died: its exit is reported below, with its code
        bar = tqdm(total=len(shards), desc=f"capture shards ({n} processes)",
                   disable=not self.progress)
        with bar:
            for w, m in self._events(self.workers):
                if "done" in m:
                    bar.update(1)
                elif m.get("finished"):
                    w.finished = True

    def close(self) -> None:
        """Stop every worker still running (they hold engines); wait for them."""
        for w in self.workers:
            if w.proc.stdin is not None and not w.proc.stdin.closed:
                with contextlib.suppress(BrokenPipeError):  # a dead worker's pipe
                    w.proc.stdin.close()
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in self.workers:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.report.close()
        self.workers = []

    def __enter__(self) -> CapturePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the worker process ------------------------------------------------------------------------
def _report(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def worker_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one capture_routing data-parallel process")
    ap.add_argument("--report-fd", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--spec", required=True, help="JSON: backend, model, dtype, options, seed")
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)

    import torch
    from transformers import AutoTokenizer

    from steerline.backends import make_backend
    from steerline.core.faults import kill_point

    torch.manual_seed(spec["seed"])
    options = spec["options"] if spec["backend"] == "vllm" else {}
    with make_backend(spec["backend"], spec["model"], spec["dtype"],
                      batch_size=spec["batch_size"], progress=False, **options) as backend:
        info = {"name": backend.name, "n_layers": backend.n_layers,
                "moe_layers": list(backend.moe_layers), "top_k": backend.top_k,
                "n_experts": backend.n_experts, "max_context": backend.max_context,
                "native": bool(getattr(backend, "native", False))}
        _report(args.report_fd, {"info": info})
        job = json.loads(sys.stdin.buffer.read() or b"{}")
        if not job:
            return  # the parent closed without a job (an error elsewhere)
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        work = Path(job["work"])
        for s in job["shards"]:
            k = int(s["k"])
            # a third list: a paired chat's target span (TargetChat, teacher-forced)
            chats = [ChatPrompt(list(c[0]), list(c[1])) if len(c) == 2
                     else TargetChat(list(c[0]), list(c[1]), list(c[2])) for c in s["chats"]]
            capture_shard(backend, tokenizer, chats, s["ids"], s["labels"],
                          job["max_new_tokens"], job["meta"], work, k)
            kill_point(f"capture:shard:{k}")
            _report(args.report_fd, {"done": k})
        _report(args.report_fd, {"finished": True})


if __name__ == "__main__":
    worker_main()
