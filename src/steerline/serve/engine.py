"""One thread drives vLLM's engine (`VLLMBackend`'s `LLMEngine`) for every HTTP request.

Requests arrive on a queue from any thread; between two engine steps the thread adds them (vLLM's
continuous batching puts requests with different steering into one batch) and passes each
step's new tokens back through the request's callback. Steering is per request exactly as in
`VLLMBackend.generate`: a request names its plan by SamplingParams.extra_args and the workers'
hooks edit only its rows. The workers hold the plans of the requests in flight: before a request
with a plan they do not hold is added, they are reconfigured (between steps, when no forward
runs) with the plans of every running request plus the new ones; plans of finished requests
drop out at the next reconfiguration. The hooks of the routing rule ("transformers": vLLM's MoE
uses the experts transformers picks) are installed at start, so unsteered requests route as in
`VLLMBackend.generate` too.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steerline.backends.vllm_backend import VLLMBackend
from steerline.backends.vllm_worker import PLAN_ARG
from steerline.steering.request import Steering

# new token ids, the finish reason ("stop", "length"; None while running), an engine error
Emit = Callable[[list[int], str | None, BaseException | None], None]


@dataclass
class _Job:
    rid: str
    ids: list[int]  # prompt token ids
    max_tokens: int
    steering: Steering | None
    emit: Emit


class SteeredEngine:
    """Greedy generation with per-request steering on one VLLMBackend, served from a thread."""

    def __init__(self, backend: VLLMBackend) -> None:
        if backend.native:
            raise ValueError("a native-capture engine runs no hooks, so it cannot steer: build "
                             "the backend with capture='hooks'")
        self.backend = backend
        self.engine = backend.llm.llm_engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._running: dict[str, _Job] = {}
        self._held: set[str] = set()  # plan ids the workers hold
        self._count = itertools.count()
        self._stop = threading.Event()
        self._configure([])  # the routing rule's hooks, before the first request
        self._thread = threading.Thread(target=self._loop, name="steerline-serve-engine",
                                        daemon=True)
        self._thread.start()

    # ---- any thread ------------------------------------------------------------------------
    def submit(self, ids: list[int], max_tokens: int, steering: Steering | None,
               emit: Emit) -> str:
        """Queue a request; `emit` is called from the engine thread with its tokens."""
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        rid = f"serve-{next(self._count)}"
        plan = None if steering is None or steering.is_noop else steering
        self._inbox.put(("add", _Job(rid, list(ids), int(max_tokens), plan, emit)))
        return rid

    def cancel(self, rid: str) -> None:
        """Stop a request (a client that went away); a finished one is ignored."""
        self._inbox.put(("cancel", rid))

    def close(self) -> None:
        """Stop the thread (running requests end with an error) and remove the hooks."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join()
        for job in self._running.values():
            job.emit([], None, RuntimeError("the server is shutting down"))
        self._running.clear()
        self.backend.llm.collective_rpc("steerline_remove_hooks")

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self._running)
            if not self._running:
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 (every waiting client hears of it)
                self._fail_all(err)
                continue
            for out in outputs:
                job = self._running.get(out.request_id)
                if job is None:  # cancelled after this step was scheduled
                    continue
                done = out.outputs[0].finish_reason if out.finished else None
                if out.finished:
                    del self._running[out.request_id]
                job.emit(list(out.outputs[0].token_ids), done, None)

    def _take(self, block: bool) -> None:
        """Every queued message (waiting for the first when nothing runs): cancellations
        applied, new requests added after one reconfiguration if their plans are new."""
        msgs = [self._inbox.get()] if block else []
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        cancelled = {rid for kind, rid in msgs if kind == "cancel"}
        new = [job for kind, job in msgs if kind == "add" and job.rid not in cancelled]
        for rid in cancelled & set(self._running):
            del self._running[rid]
            self.engine.abort_request([rid])
        if not new:
            return
        if any(j.steering is not None and j.steering.plan_id not in self._held for j in new):
            try:
                self._configure([*self._running.values(), *new])
            except Exception as err:  # noqa: BLE001 (a plan the workers refuse: its requests)
                for job in new:
                    job.emit([], None, err)
                return
        for job in new:
            try:
                self.engine.add_request(job.rid, {"prompt_token_ids": job.ids}, self._params(job))
            except Exception as err:  # noqa: BLE001 (vLLM refuses this one request)
                job.emit([], None, err)
                continue
            self._running[job.rid] = job

    def _configure(self, jobs: list[_Job]) -> None:
        wire = {j.steering.plan_id: j.steering.to_wire() for j in jobs if j.steering is not None}
        self.backend.llm.collective_rpc("steerline_configure",
                                        args=(False, wire, self.backend.routing_rule))
        self._held = set(wire)

    def _params(self, job: _Job) -> Any:
        """VLLMBackend.generate's sampling (greedy, its end-of-sequence ids, no detokenizing),
        streamed: each step returns only the new tokens."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = None if job.steering is None else {PLAN_ARG: job.steering.plan_id}
        return SamplingParams(temperature=0.0, max_tokens=job.max_tokens,
                              stop_token_ids=self.backend.eos, detokenize=False,
                              extra_args=extra, output_kind=RequestOutputKind.DELTA)

    def _fail_all(self, err: BaseException) -> None:
        jobs, self._running = list(self._running.values()), {}
        if jobs:
            self.engine.abort_request([j.rid for j in jobs])
        for job in jobs:
            job.emit([], None, err)
