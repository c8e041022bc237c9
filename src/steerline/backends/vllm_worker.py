"""What runs inside each vLLM worker: forward hooks on the loaded model, no forked model files.

`SteerlineWorkerExtension` is passed to vLLM as `worker_extension_cls`; the driver calls its
methods by name through `LLM.collective_rpc` (in-process on CPU with
VLLM_ENABLE_V1_MULTIPROCESSING=0; on a GPU over vLLM's RPC to each worker process).

Hooks on the model the worker's runner holds (installed by `configure`, removed by `remove`):
- a pre-hook on the whole model reads the scheduled batch before every forward: the running
  requests in row order (`input_batch.req_ids`), their row offsets (`query_start_loc`) and the
  token positions; each request names itself and its steering by its SamplingParams.extra_args;
- a forward hook on every router (found by `steerline.model.arch.find_routers`, as for
  transformers models; the rule per router from the same place, checked against the routing
  vLLM's fused MoE was built with, `families.vllm_router_kwargs`): the SteerMoE edit of the
  steered requests' rows, then the routing rule (below) and, when capturing, the top-k ids and
  weights of every row by the family's own `select`. For the rules that rank the logits or their
  softmax (every family but DeepSeek-V3) the edit is new logits (`families.steer_logits`), which
  vLLM's routing function ranks as the family does. DeepSeek-V3 ranks sigmoid(logits) + its
  correction bias within groups, which no logit edit can always reorder: its steered rows get
  `families.steer`'s ids and weights inside vLLM's fused MoE router (`_compute_routing` of that
  layer's router, wrapped for the call);
- a forward hook on a decoder layer for activation steering of the rows that ask for it. vLLM
  layers return (hidden, residual) with the residual add deferred to the next layer's fused
  add-norm; the residual stream is hidden + residual, so a steered row returns
  (steered stream, 0) and the next add gives the steered stream exactly;
- a post-hook moves the forward's routing [rows, layers, k] to the CPU in one copy.
Rows past the scheduled tokens (padding) and forwards with no scheduled request (warm-up, dummy
batches) are ignored. Needs an eager model (enforce_eager=True): hooks do not run inside CUDA
graphs or compiled regions.

Routing rule: transformers picks the top-k of float32 softmax probabilities, vLLM's fused MoE
the top-k of the logits. On a near-uniform router (the default MoE: logit std ~1e-3) logits
less than ~1e-7 apart round to equal probabilities, transformers breaks the tie by expert index
and vLLM does not see it; each such flip changes that token's FFN output and answers can drift.
Rule "transformers" makes vLLM's MoE use the transformers choice: on tie rows only, any expert
outside the transformers top-k whose logit reaches the smallest chosen one is lowered to the next
float below it (the chosen logits, hence the weights, are untouched); this applies to the rules
whose top-k is a top-k of the logits (`families.LOGIT_TOPK_RULES`); the group-limited DeepSeek
rules are captured by `select`, the float32 formula vLLM's grouped top-k computes. Rule "engine"
keeps vLLM's choice (and plain generation then runs with no hook at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from steerline.model.arch import (
    DenseModelError,
    RouterSite,
    decoder_layers,
    find_routers,
    moe_shape,
    router_topk,
)
from steerline.model.families import (
    LOGIT_TOPK_RULES,
    RouterRule,
    check_vllm_family,
    select,
    steer,
    steer_logits,
    vllm_router_kwargs,
)
from steerline.steering.request import Steering

KEY_ARG = "steerline_key"
PLAN_ARG = "steerline_plan"
ROUTING_RULES = ("transformers", "engine")
Capture = tuple[np.ndarray, np.ndarray, np.ndarray]  # positions [n], ids [n, L, k], weights


def enforce_topk(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits [N, E] whose top-k (taken on the logits, as vLLM does) is exactly the set `ids`
    [N, k]; rows without a tie come back unchanged, bit for bit."""
    chosen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    chosen.scatter_(-1, ids, True)
    inf = torch.tensor(float("inf"), dtype=logits.dtype, device=logits.device)
    floor = torch.where(chosen, logits, inf).amin(dim=-1, keepdim=True)  # [N, 1]
    return torch.where(~chosen & (logits >= floor), torch.nextafter(floor, -inf), logits)


def force_rows(weights: torch.Tensor, ids: torch.Tensor,
               forced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's routing (weights, ids) [N, k] with rows replaced by `forced` (rows, ids, weights)
    each, dtypes kept (the fused MoE reads contiguous float32 / int32 buffers)."""
    weights, ids = weights.clone(), ids.clone()
    for rows, f_ids, f_w in forced:
        ids[rows] = f_ids.to(ids.dtype)
        weights[rows] = f_w.to(weights.dtype)
    return weights.contiguous(), ids.contiguous()


def forced_routing(compute: Callable, forced_of: Callable[[], list | None]) -> Callable:
    """A fused-MoE router's `_compute_routing` whose rows named by `forced_of()` (read at call
    time) are replaced (`force_rows`); the other rows are vLLM's own."""
    def routing(hidden_states: torch.Tensor, router_logits: torch.Tensor,
                indices_type: torch.dtype | None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = compute(hidden_states, router_logits, indices_type, **kwargs)
        forced = forced_of()
        return force_rows(weights, ids, forced) if forced else (weights, ids)

    return routing


def check_engine_router(router: Any, rule: RouterRule, layer: int) -> None:
    """One clear error when vLLM's fused MoE router of `layer` does not route by the family's
    rule (e.g. a config key vLLM reads and transformers does not); attributes a router class
    lacks are not compared (routers differ by platform)."""
    missing = object()
    for key, want in vllm_router_kwargs(rule).items():
        if key == "routed_scaling_factor":
            continue  # vLLM may scale the MoE output instead (apply_routed_scale_to_output)
        got = getattr(router, key, missing)
        if got is missing:
            continue
        if key == "e_score_correction_bias":
            same = (got is None) == (want is None)
        elif key == "custom_routing_function":
            same = (got is None) == (want is None) and (want is None or
                                                       got.__name__ == want.__name__)
        else:
            same = got == want
        if not same:
            raise RuntimeError(
                f"decoder layer {layer}: vLLM's fused MoE routes with {key}={got!r}, the "
                f"family's rule {rule.rule} needs {key}={want!r}: use the transformers backend")


def _fused_router(block: nn.Module | None) -> Any:
    """The FusedMoERouter of a vLLM MoE block (block.experts is the MoE runner), or None."""
    experts = getattr(block, "experts", None) if block is not None else None
    return getattr(experts, "router", None)


class _Unpatch:
    """A hook-like handle that restores a router's own `_compute_routing`."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def remove(self) -> None:
        self.router.__dict__.pop("_compute_routing", None)


@dataclass
class _Plan:
    """One Steering compiled for this worker's model."""

    experts: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (activate, deactivate)
    delta: float
    act_layer: int | None
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class _Batch:
    """The scheduled batch of one forward, as the hooks see it."""

    keys: list[str | None]  # per request, in row order
    qsl: np.ndarray  # [n_reqs + 1] row offsets
    n_rows: int  # scheduled rows; the model may see padding after them
    positions: torch.Tensor  # [n_rows]
    expert_rows: list[tuple[torch.Tensor, _Plan]]
    act_rows: dict[int, list[tuple[torch.Tensor, Callable]]]  # layer -> [(rows, fn)]
    ids: list[torch.Tensor | None]
    weights: list[torch.Tensor | None]
    # router index -> rows whose routing is set inside the fused MoE (DeepSeek-V3 steering)
    forced: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class SteerlineState:
    """Hooks and buffers of one worker (one model)."""

    def __init__(self, runner: Any, rank: int = 0) -> None:
        self.runner = runner
        self.rank = rank
        self.model: nn.Module = runner.get_model()
        cfg = runner.model_config.hf_text_config
        self.hidden_size = int(cfg.hidden_size)
        self.layers = decoder_layers(self.model)
        # The model layer finds the routers, as for transformers models (same paths, same
        # [E, hidden] weight check); a dense model has none and serves plain generation.
        try:
            self.n_experts, self.top_k = moe_shape(self.model, cfg)
        except DenseModelError:
            self.n_experts, self.top_k = 0, 0
        sites: list[RouterSite] = []
        if self.n_experts:
            from vllm.platforms import current_platform

            check_vllm_family(cfg, cpu=current_platform.is_cpu())
            sites = find_routers(self.model, cfg)  # dense layers (first_k_dense_replace) skipped
        self.routers: list[nn.Module] = [s.module for s in sites]
        self.moe_layers: list[int] = [s.layer for s in sites]  # decoder-layer index per router
        # The family's rule per router, from the config (vLLM's gate is a plain linear layer;
        # DeepSeek's correction bias is the gate's parameter), checked against the routing
        # vLLM's fused MoE was built with.
        self.rules: list[RouterRule] = [s.rule for s in sites]
        self.fused: list[Any] = []  # vLLM's fused MoE router per site (None if not found)
        for s in sites:
            block = _parent(self.layers[s.layer], s.name.split(".", 3)[3])
            fused = _fused_router(block)
            if fused is not None:
                check_engine_router(fused, s.rule, s.layer)
            self.fused.append(fused)
        self.device = next(self.model.parameters()).device
        self.capture = False
        self.rule = "transformers"
        self.plans: dict[str, _Plan] = {}
        self.blocks: list[tuple[list[str | None], np.ndarray, np.ndarray, np.ndarray,
                                np.ndarray]] = []
        self.cur: _Batch | None = None
        self.handles: list[Any] = []
        self.act_handles: list[Any] = []

    # ---- control (called through collective_rpc) ------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"n_layers": len(self.routers), "moe_layers": list(self.moe_layers),
                "n_experts": self.n_experts, "top_k": self.top_k,
                "hooks": len(self.handles) + len(self.act_handles)}

    def configure(self, capture: bool, plans: dict[str, dict[str, Any]], rule: str) -> None:
        """Capture on/off, the routing rule, and the steering requests (plan id -> wire form).
        Hooks are (re)installed only where something needs them."""
        if rule not in ROUTING_RULES:
            raise ValueError(f"routing rule must be one of {ROUTING_RULES}, got {rule!r}")
        compiled = {pid: self._compile(Steering.from_wire(raw)) for pid, raw in plans.items()}
        self.remove()
        self.rule, self.plans = rule, compiled
        self.capture = bool(capture) and bool(self.routers) and self.rank == 0
        needs_routers = self.capture or any(p.experts for p in compiled.values()) or (
            bool(self.routers) and rule == "transformers")
        if not (needs_routers or compiled):
            return
        self.handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._post))
        if needs_routers:
            self.handles += [r.register_forward_hook(self._router_hook(i))
                             for i, r in enumerate(self.routers)]
        forced = {i for p in compiled.values() for i in p.experts
                  if self.rules[i].rule == "sigmoid_group_topk"}
        for i in sorted(forced):
            if self.fused[i] is None:
                raise RuntimeError(f"decoder layer {self.moe_layers[i]}: no fused MoE router "
                                   "found to steer (DeepSeek-V3 steering sets its routing)")
            router = self.fused[i]
            router._compute_routing = forced_routing(router._compute_routing,
                                                     self._forced_of(i))
            self.handles.append(_Unpatch(router))
        for layer in sorted({p.act_layer for p in compiled.values() if p.act_fn is not None}):
            self.act_handles.append(
                self.layers[layer].register_forward_hook(self._act_hook(layer)))

    def remove(self) -> None:
        for h in [*self.handles, *self.act_handles]:
            h.remove()
        self.handles, self.act_handles, self.cur = [], [], None

    def _compile(self, steering: Steering) -> _Plan:
        experts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        plan = steering.experts
        if plan is not None and not plan.empty:
            if not self.routers:
                raise ValueError("expert steering needs a Mixture-of-Experts model")
            plan.validate(self.moe_layers, self.n_experts, self.top_k)
            slot = {layer: i for i, layer in enumerate(self.moe_layers)}  # router hook index
            experts = {slot[layer]: (torch.tensor(a, dtype=torch.long, device=self.device),
                                     torch.tensor(d, dtype=torch.long, device=self.device))
                       for layer, (a, d) in plan.per_layer().items()}
        act_layer, act_fn = None, None
        if steering.activation is not None:
            steering.activation.check(self.hidden_size, len(self.layers))
            act_layer, act_fn = steering.activation.layer, steering.activation.fn(self.device)
        delta = plan.delta if plan is not None and plan.delta is not None else 0.0
        return _Plan(experts, delta, act_layer, act_fn)

    def take(self) -> dict[str, Capture]:
        """Captured routing per request key: positions [n], ids [n, L, k], weights [n, L, k]
        (a position seen twice, e.g. recomputed after preemption, keeps its last capture)."""
        parts: dict[str, list[Capture]] = {}
        for keys, qsl, pos, ids, w in self.blocks:
            for i, key in enumerate(keys):
                if key is not None:
                    s, e = int(qsl[i]), int(qsl[i + 1])
                    parts.setdefault(key, []).append((pos[s:e], ids[s:e], w[s:e]))
        self.blocks = []
        out = {}
        for key, chunks in parts.items():
            pos, ids, w = (np.concatenate([c[j] for c in chunks]) for j in range(3))
            last = len(pos) - 1 - np.unique(pos[::-1], return_index=True)[1]
            out[key] = (pos[last], ids[last], w[last])
        return out

    # ---- hooks -------------------------------------------------------------------------------
    def _forced_of(self, layer: int) -> Callable[[], list | None]:
        return lambda: None if self.cur is None else self.cur.forced.get(layer)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.cur = None
        runner = self.runner
        n = int(runner.input_batch.num_reqs)
        if n == 0 or not (self.capture or self.plans):
            return
        qsl = np.asarray(runner.query_start_loc.np[: n + 1]).copy()
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        n_rows = int(qsl[-1])
        if positions is None or positions.shape[-1] < n_rows:
            return  # not a scheduled batch (warm-up / dummy run)
        keys: list[str | None] = []
        by_plan: dict[str, list[int]] = {}
        for i, rid in enumerate(runner.input_batch.req_ids[:n]):
            params = getattr(runner.requests.get(rid), "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            keys.append(extra.get(KEY_ARG))
            pid = extra.get(PLAN_ARG)
            if pid is not None:
                if pid not in self.plans:
                    raise RuntimeError(f"request {rid} asks for unknown steering plan {pid}")
                by_plan.setdefault(pid, []).append(i)
        expert_rows: list[tuple[torch.Tensor, _Plan]] = []
        act_rows: dict[int, list[tuple[torch.Tensor, Callable]]] = {}
        for pid, reqs in by_plan.items():
            plan = self.plans[pid]
            rows = torch.from_numpy(np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in reqs]))
            rows = rows.to(self.device)
            if plan.experts:
                expert_rows.append((rows, plan))
            if plan.act_fn is not None:
                act_rows.setdefault(plan.act_layer, []).append((rows, plan.act_fn))
        n_routers = len(self.routers)
        self.cur = _Batch(keys, qsl, n_rows, positions[..., :n_rows], expert_rows, act_rows,
                          [None] * n_routers, [None] * n_routers, {})

    def _router_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            cur = self.cur
            is_tuple = isinstance(output, tuple)
            logits = output[0] if is_tuple else output
            rule = self.rules[layer]
            edited = None
            forced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for rows, plan in cur.expert_rows if cur is not None else ():
                if layer in plan.experts:
                    act, deact = plan.experts[layer]
                    if rule.rule == "sigmoid_group_topk":
                        _, f_ids, f_w = steer(logits[rows], rule, act, deact, plan.delta)
                        forced.append((rows, f_ids, f_w))
                        continue
                    # float32 as expert_steering returns it: a bf16 cast would round delta away
                    edited = logits.float().clone() if edited is None else edited
                    edited[rows] = steer_logits(logits[rows], rule, act, deact, plan.delta)
            src = logits if edited is None else edited
            capture = cur is not None and self.capture
            if self.rule == "transformers" and rule.rule in LOGIT_TOPK_RULES:
                _, ids, w = router_topk(src, rule)
                edited = src = enforce_topk(src, ids)
            elif capture:  # "engine": vLLM's own choice; the group-limited rules: the same
                # float32 formula vLLM computes under either rule
                ids, w = select(src, rule, engine=self.rule == "engine")
            if forced:
                # vLLM's router scales by its own factor (1 when it scales the output instead)
                scale = float(getattr(self.fused[layer], "routed_scaling_factor", rule.scaling))
                cur.forced[layer] = [(r, i, w_ * (scale / rule.scaling)) for r, i, w_ in forced]
                if capture:
                    w, ids = force_rows(w, ids, forced)
            if capture:
                cur.ids[layer], cur.weights[layer] = ids[: cur.n_rows], w[: cur.n_rows]
            if edited is None:
                return None
            return (edited, *output[1:]) if is_tuple else edited

        return hook

    def _act_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            cur = self.cur
            if cur is None or layer not in cur.act_rows:
                return None
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            new_h = hidden.clone()
            new_r = None if residual is None else residual.clone()
            for rows, fn in cur.act_rows[layer]:
                stream = hidden[rows] if residual is None else (
                    hidden[rows].float() + residual[rows].float()).to(hidden.dtype)
                new_h[rows] = fn(stream).to(hidden.dtype)
                if new_r is not None:
                    new_r[rows] = 0
            return new_h if residual is None else (new_h, new_r)

        return hook

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        cur, self.cur = self.cur, None
        if cur is None or not self.capture:
            return
        if any(x is None for x in cur.ids):
            raise RuntimeError("a router did not run in the last forward")
        ids = torch.stack(cur.ids, dim=1).to(torch.int16).cpu().numpy()  # [T, L, k]
        w = torch.stack(cur.weights, dim=1).to(torch.float16).cpu().numpy()
        pos = cur.positions.reshape(-1).to(torch.int32).cpu().numpy()
        self.blocks.append((cur.keys, cur.qsl, pos, ids, w))


def _parent(layer: nn.Module, path: str) -> nn.Module | None:
    """The module holding the router at `path` (e.g. "mlp.gate" -> layer.mlp)."""
    module: nn.Module | None = layer
    for part in path.split(".")[:-1]:
        module = getattr(module, part, None)
    return module


class SteerlineWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called by name."""

    def _steerline(self) -> SteerlineState:
        state = getattr(self, "_steerline_state", None)
        if state is None:
            state = SteerlineState(self.model_runner, int(getattr(self, "rank", 0)))
            self._steerline_state = state
        return state

    def steerline_info(self) -> dict[str, Any]:
        return self._steerline().info()

    def steerline_configure(self, capture: bool, plans: dict[str, dict[str, Any]],
                            rule: str) -> None:
        self._steerline().configure(capture, plans, rule)

    def steerline_take(self) -> dict[str, Capture]:
        return self._steerline().take()

    def steerline_remove_hooks(self) -> None:
        self._steerline().remove()
