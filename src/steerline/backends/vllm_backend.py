"""The vLLM backend: generation, routing capture and steering through vLLM's public API.

- The engine is `vllm.LLM` with `worker_extension_cls` = steerline's extension
  (`steerline.backends.vllm_worker`); the driver talks to it only by `LLM.collective_rpc`, with
  JSON-able arguments (plan ids, lists, numbers). On CPU the engine runs in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here unless the caller set it), so nothing is
  serialized. On a GPU the same calls reach every worker process over vLLM's own RPC (its
  message queue serializes arguments and results with pickle internally: steerline sends only
  plain data through it and never writes pickle).
- The hooks live only inside `_hooked()`: installed for one generate call, removed afterwards
  (also on errors).
- Many requests are in flight at once (vLLM's continuous batching, `max_num_seqs`); the hooks map
  every router row to its request through the scheduled batch, and requests are named by
  SamplingParams.extra_args. Prefix caching is off: a cached prefix would skip the forward
  of its tokens, so their routing would never be seen. On a GPU the engine runs vLLM's V1 model
  runner (the batch the hooks read; 0.32 defaults to V2 there).
- capture="auto" (default): on a CUDA GPU whose vLLM returns routed experts itself, with
  routing_rule="engine", capture uses that instead of hooks (prefix caching on, no weights, no
  steering; steerline.backends.vllm_native); the hooks everywhere else, CPU always.
- Greedy decoding, dtype explicit (float32 by default): vLLM's dtype "auto" downcasts float32
  checkpoints to bfloat16, which turns the default MoE's tiny router logits (std ~1e-3) into
  ties and changes the answers within a few tokens. The end-of-sequence ids of
  generation_config.json are passed explicitly as stop_token_ids, so vLLM stops exactly where the
  transformers backend does whatever the engine's defaults.
- Routing rule "transformers" (default, see vllm_worker): vLLM's MoE uses the experts the
  transformers rule picks, so float ties break the same way in both backends.
- The last answer token is never fed back by the engine (it is sampled, then the request ends);
  its routing comes from one more step (max_tokens = max_new_tokens + 1, the extra token
  dropped) or, for requests that ended on an end-of-sequence token, from a one-token follow-up
  request over the whole sequence.
- Steering is per request: each request names its Steering, the hooks edit only its rows.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerline import numerics
from steerline.backends.base import Backend, Generated, Prompt, eos_token_ids, prompt_ids
from steerline.backends.vllm_native import (
    native_engine_kwargs,
    native_rows,
    select_runner,
    use_native,
)
from steerline.backends.vllm_worker import KEY_ARG, PLAN_ARG, ROUTING_RULES, Capture
from steerline.core.chat import ChatPrompt
from steerline.model.families import check_vllm_family
from steerline.model.load import check_weights, load_tokenizer
from steerline.steering.capture import Routed, check_context
from steerline.steering.request import Steering, SteeringArg, per_prompt

EXTENSION = "steerline.backends.vllm_worker.SteerlineWorkerExtension"
CPU_KV_CACHE_BYTES = 1 << 30  # default KV cache on CPU (vLLM's own default is several GiB)


def vllm_available() -> bool:
    numerics.pin_vllm_cpu()
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 (any import failure means: no usable vLLM)
        return False
    return True


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        routing_rule: str = "transformers",
        progress: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        capture: str = "auto",
    ) -> None:
        if routing_rule not in ROUTING_RULES:
            raise ValueError(f"routing_rule must be one of {ROUTING_RULES}, got {routing_rule!r}")
        if data_parallel_size != 1:  # vLLM 0.32: LLM(data_parallel_size > 1) raises
            raise ValueError("one vLLM engine is one data-parallel rank: for data parallel "
                             "capture use steerline.steermoe.routing.capture_dp.CapturePool "
                             "(capture_routing.data_parallel_size), one engine per process")
        if dtype == "auto":
            raise ValueError("pass an explicit dtype: vLLM's 'auto' downcasts float32 "
                             "checkpoints to bfloat16 on CPU, which ties the default MoE's routers")
        gpu = torch.cuda.is_available()
        if Path(model_path, "config.json").is_file():  # before any weights are read
            from transformers import AutoConfig

            check_vllm_family(AutoConfig.from_pretrained(model_path), cpu=not gpu)
        if Path(model_path).is_dir():
            # vLLM would fail on a truncated safetensors file in its loader's traceback, or
            # serve a tokenizer-less directory: the same one-line checks as transformers
            check_weights(model_path)
            load_tokenizer(model_path)
        self.llm = None
        self._threads: tuple[Any, int] | None = None
        self._env_set: list[str] = []  # variables this engine set, removed by close()
        # vLLM's own routed-experts capture where it exists and fits (steerline.backends.
        # vllm_native: GPU, routing rule "engine", no weights); the hooks otherwise.
        self.native = use_native(capture, gpu, routing_rule)
        if gpu:
            select_runner(self.native)  # V1 for the hooks, V2 for native capture
        if not gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
            # The process's torch threads, unbound, unless the caller sets OMP_NUM_THREADS: vLLM
            # would bind one per core, and bound threads on a busy (shared) machine stall each
            # other at every parallel op (measured up to 30x slower); an OMP_NUM_THREADS set here
            # also stops vLLM cutting serving to one thread. The stage commands set
            # OMP_WAIT_POLICY=PASSIVE, so waiting threads sleep instead of spinning.
            # Under steerline's numerics contract OMP_NUM_THREADS is already its fixed count.
            n = torch.get_num_threads()
            self._threads = (torch.set_num_threads, n)
            for var, value in (("OMP_NUM_THREADS", str(n)),
                               ("VLLM_CPU_OMP_THREADS_BIND", "nobind")):
                if var not in os.environ:
                    os.environ[var] = value
                    self._env_set.append(var)
        numerics.pin_vllm_cpu()  # before vLLM picks its CPU kernels
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
            enforce_eager=True,  # hooks do not run inside CUDA graphs or compiled regions
            enable_prefix_caching=False,
            tensor_parallel_size=int(tensor_parallel_size),
            worker_extension_cls=EXTENSION,
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = int(max_num_seqs)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_memory_bytes is None and not gpu:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if self.native:
            kwargs.update(native_engine_kwargs())  # prefix caching on: the engine keeps routing
        kwargs.update(engine_kwargs or {})
        self.model_path = str(model_path)
        self.routing_rule = routing_rule
        self.progress = progress
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            self.close()
            raise
        info = self._rpc("steerline_info")
        self.n_layers, self.top_k = int(info["n_layers"]), int(info["top_k"])
        self.moe_layers = tuple(int(x) for x in info["moe_layers"])
        self.n_experts = int(info["n_experts"])
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.eos = eos_token_ids(model_path)

    # ---- plumbing ------------------------------------------------------------------------------
    def _rpc(self, method: str, *args: Any) -> Any:
        return self.llm.collective_rpc(method, args=args)[0]  # rank 0 holds the capture

    @contextlib.contextmanager
    def _hooked(self, capture: bool, plans: list[Steering | None]) -> Iterator[None]:
        """The workers' hooks for one call: capture on/off and these requests' steering."""
        wire = {p.plan_id: p.to_wire() for p in plans if p is not None}
        try:
            self.llm.collective_rpc("steerline_configure",
                                    args=(capture, wire, self.routing_rule))
            yield
        finally:
            self.llm.collective_rpc("steerline_remove_hooks")

    def _params(self, max_tokens: int, key: str | None, plan: Steering | None) -> Any:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if key is not None:
            extra[KEY_ARG] = key
        if plan is not None:
            extra[PLAN_ARG] = plan.plan_id
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=self.eos,
                              detokenize=False, extra_args=extra or None)

    def _answer(self, output: Any, max_new_tokens: int) -> list[int]:
        gen = list(output.outputs[0].token_ids)[:max_new_tokens]
        for j, t in enumerate(gen):
            if t in self.eos:
                return gen[: j + 1]
        return gen

    # ---- the interface -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int,
                 steering: SteeringArg = None) -> list[Generated]:
        ids = [prompt_ids(p) for p in prompts]
        check_context(ids, None, max_new_tokens, self.max_context)
        plans = per_prompt(steering, len(ids))
        self._no_steering_if_native(plans)
        if max_new_tokens == 0:
            return [Generated(np.zeros(0, np.int32), False) for _ in ids]
        params = [self._params(max_new_tokens, None, p) for p in plans]
        with self._hooked(False, plans):
            outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params,
                                     use_tqdm=self.progress)
        res = []
        for o in outs:
            gen = self._answer(o, max_new_tokens)
            finished = bool(gen and gen[-1] in self.eos)
            res.append(Generated(np.asarray(gen, dtype=np.int32), finished))
        return res

    def generate_and_capture(self, prompts: Sequence[ChatPrompt], max_new_tokens: int,
                             steering: SteeringArg = None) -> list[Routed]:
        if not self.n_layers:
            raise ValueError(f"{self.model_path} is a dense model: routing capture needs a "
                             "Mixture-of-Experts model")
        ids = [prompt_ids(p) for p in prompts]
        check_context(ids, None, max_new_tokens, self.max_context)
        plans = per_prompt(steering, len(ids))
        if self.native:
            return self._capture_native(prompts, ids, max_new_tokens, plans)
        run = uuid.uuid4().hex[:8]
        keys = [f"{run}-{i}" for i in range(len(ids))]
        # One step past max_new_tokens feeds the last kept token (its routing); its output dropped.
        params = [self._params(min(max_new_tokens + 1, self.max_context - len(x)), k, p)
                  for x, k, p in zip(ids, keys, plans, strict=True)]
        with self._hooked(True, plans):
            outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params,
                                     use_tqdm=self.progress)
            gens = [self._answer(o, max_new_tokens) for o in outs]
            got = self._rpc("steerline_take")
            # Requests that ended on EOS never fed their last token: one-token follow-ups.
            follow = [i for i, (x, g) in enumerate(zip(ids, gens, strict=True))
                      if g and not _has(got.get(keys[i]), len(x) + len(g) - 1)]
            if follow:
                fparams = [self._params(1, f"{keys[i]}-last", plans[i]) for i in follow]
                self.llm.generate([{"prompt_token_ids": ids[i] + gens[i]} for i in follow],
                                  fparams, use_tqdm=False)
                more = self._rpc("steerline_take")
        for i in follow:
            pos, e, w = more[f"{keys[i]}-last"]
            sel = pos == len(ids[i]) + len(gens[i]) - 1
            p0, e0, w0 = got[keys[i]]
            got[keys[i]] = (np.r_[p0, pos[sel]], np.concatenate([e0, e[sel]]),
                            np.concatenate([w0, w[sel]]))
        return [self._routed(p, g, got.get(k)) for p, g, k in zip(prompts, gens, keys, strict=True)]

    def _no_steering_if_native(self, plans: list[Steering | None]) -> None:
        if self.native and any(p is not None for p in plans):
            raise ValueError("this engine captures routing natively (prefix caching on, no "
                             "hooks): steering needs VLLMBackend(capture='hooks')")

    def _capture_native(self, prompts: Sequence[ChatPrompt], ids: list[list[int]],
                        max_new_tokens: int, plans: list[Steering | None]) -> list[Routed]:
        """generate_and_capture from vLLM's routed_experts: one step past max_new_tokens feeds
        the last kept token; requests that ended on EOS get a one-token follow-up over the whole
        sequence (prefix-cached: only its last token runs). Weights are NaN (not returned)."""
        self._no_steering_if_native(plans)
        params = [self._params(min(max_new_tokens + 1, self.max_context - len(x)), None, None)
                  for x in ids]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params,
                                 use_tqdm=self.progress)
        gens = [self._answer(o, max_new_tokens) for o in outs]
        rows = [native_rows(o, self.moe_layers) for o in outs]  # [fed, L, k] each
        follow = [i for i, (x, g) in enumerate(zip(ids, gens, strict=True))
                  if len(rows[i]) < len(x) + len(g)]
        if follow:
            more = self.llm.generate([{"prompt_token_ids": ids[i] + gens[i]} for i in follow],
                                     [self._params(1, None, None) for _ in follow],
                                     use_tqdm=False)
            for i, o in zip(follow, more, strict=True):
                rows[i] = native_rows(o, self.moe_layers)
        res = []
        for p, g, r in zip(prompts, gens, rows, strict=True):
            n = len(prompt_ids(p)) + len(g)
            if len(r) < n:
                raise RuntimeError(f"vLLM returned routing for {len(r)} of {n} tokens")
            pos = np.arange(n, dtype=np.int32)
            res.append(self._routed(p, g, (pos, r[:n], np.full(r[:n].shape, np.nan, np.float16))))
        return res

    def _routed(self, prompt: ChatPrompt, gen: list[int],
                cap: Capture | None) -> Routed:
        n_p, n_g = len(prompt.ids), len(gen)
        n = n_p + n_g
        if cap is None:
            raise RuntimeError("no routing was captured for a request")
        pos, e, w = cap
        order = np.argsort(pos, kind="stable")
        pos, e, w = pos[order], e[order], w[order]
        keep = pos < n
        pos, e, w = pos[keep], e[keep], w[keep]
        if len(pos) != n or not np.array_equal(pos, np.arange(n)):
            missing = sorted(set(range(n)) - set(pos.tolist()))[:5]
            raise RuntimeError(f"routing capture incomplete: positions {missing} of {n} missing "
                               "(prefix caching on, or an unsupported vLLM scheduler)")
        is_tmpl = prompt.is_template if isinstance(prompt, ChatPrompt) else [True] * n_p
        return Routed(
            token_ids=np.asarray(list(prompt.ids) + gen, dtype=np.int32),
            is_generated=np.r_[np.zeros(n_p, bool), np.ones(n_g, bool)],
            is_template=np.r_[np.asarray(is_tmpl, bool), np.zeros(n_g, bool)],
            experts=e.reshape(n, -1).astype(np.int16),
            weights=w.reshape(n, -1).astype(np.float16),
            n_prompt=n_p,
            n_generated=n_g,
            finished=bool(n_g and gen[-1] in self.eos),
        )

    def close(self) -> None:
        """Shut the engine down and give the process back its torch threads (vLLM's CPU worker
        replaces torch.set_num_threads with a no-op)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if self._threads is not None:
            (set_threads, n), self._threads = self._threads, None
            torch.set_num_threads = set_threads
            set_threads(n)
        for var in self._env_set:
            os.environ.pop(var, None)
        self._env_set = []


def _has(cap: Capture | None, position: int) -> bool:
    return cap is not None and bool((cap[0] == position).any())
