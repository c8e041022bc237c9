"""A request's `steering` object -> the backend's `Steering`, and what was applied.

    "steering": {
      "experts": {"mode": "deactivate_unsafe", "n": 4, "delta": 1.0}     from --experts
               | {"activate": [[layer, expert], ...], "deactivate": [...], "delta": 1.0},
      "mat_steer": {"attributes": ["toxicity"], "scale": 1.0},            from --mat
      "gate": true | "residual" | "routing"                               from --gate
    }

Every key is optional; no steering (or an empty one) is the unsteered model. Expert plans are
built by the pipeline's own rules (`selection_plan`, `SteeringPlan.validate`), so a plan equals
`steerline generate`'s for the same flags. Anything the server cannot honour is a `BadRequest`
whose message says what to fix.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steerline.mat_steer.checkpoint import attribute_index
from steerline.serve.artifacts import GATE_SOURCES, Artifacts
from steerline.steering.experts import MODES, SteeringPlan, check_experts
from steerline.steering.gated import SteeringModule, with_vector_scale
from steerline.steering.request import ActivationSteering, Steering
from steerline.steermoe.gating.prompt_gate import PromptGate
from steerline.steermoe.gating.scoring import score_prompts
from steerline.steermoe.safety.steering_plan import selection_plan

KEYS = ("experts", "mat_steer", "gate")
SELECT_KEYS, LIST_KEYS = ("mode", "n", "delta"), ("activate", "deactivate", "delta")
MAT_KEYS = ("attributes", "scale")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message says what to fix."""


@dataclass(frozen=True)
class ModelShape:
    moe_layers: tuple[int, ...]  # decoder-layer index of each MoE layer (empty: dense)
    n_experts: int
    top_k: int


@dataclass
class Requested:
    """One request's steering before its gate decides: `steering` is applied unless `gate`
    is set and does not fire on the prompt."""

    steering: Steering | None = None
    gate: PromptGate | None = None
    applied: dict[str, Any] = field(default_factory=dict)  # the response's `steering` field


def parse_steering(raw: object, arts: Artifacts, shape: ModelShape) -> Requested:
    if raw is None:
        return Requested(applied={"steered": False})
    if not isinstance(raw, dict):
        raise BadRequest('steering must be an object such as {"experts": {"mode": '
                         '"deactivate_unsafe"}}, got ' + _short(raw))
    _known(raw, KEYS, "steering")
    plan = _experts(raw.get("experts"), arts, shape)
    activation, mat_info = _mat(raw.get("mat_steer"), arts)
    gate = _gate(raw.get("gate"), arts)
    if gate is not None and plan is None and activation is None:
        raise BadRequest("steering.gate decides whether a prompt is steered: add steering.experts "
                         "or steering.mat_steer, or leave gate out")
    steering = None if plan is None and activation is None else Steering(plan, activation)
    applied = {"experts": None if plan is None else plan.to_json(), "mat_steer": mat_info,
               "gate": None, "steered": steering is not None and not steering.is_noop}
    return Requested(steering, gate, applied)


_gate_lock = threading.Lock()  # one prefill at a time on the shared transformers model


def decide_gate(req: Requested, arts: Artifacts, text: str) -> Steering | None:
    """The steering to apply to the user text `text`: the gate (when asked) scores it on an
    unsteered prefill; records the decision in `req.applied`."""
    if req.gate is None:
        return req.steering
    model, tok = arts.gate_model
    with _gate_lock:
        scores, fires = score_prompts({"gate": req.gate}, model, tok, [text], batch_size=1)["gate"]
    fired = bool(fires[0])
    req.applied["gate"] = {"source": req.gate.source, "score": float(scores[0]),
                           "threshold": req.gate.threshold, "fired": fired}
    req.applied["steered"] = fired and req.applied["steered"]
    return req.steering if fired else None


def _experts(raw: object, arts: Artifacts, shape: ModelShape) -> SteeringPlan | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("steering.experts must be an object: {\"mode\", \"n\", \"delta\"} or "
                         "{\"activate\", \"deactivate\", \"delta\"}, got " + _short(raw))
    if not shape.moe_layers:
        raise BadRequest("steering.experts needs a Mixture-of-Experts model; this server's is "
                         "dense: use steering.mat_steer")
    explicit = "activate" in raw or "deactivate" in raw
    _known(raw, LIST_KEYS if explicit else SELECT_KEYS, "steering.experts")
    if not explicit and arts.experts is None:
        raise BadRequest("steering.experts selects from experts.json, which this server was not "
                         "started with: restart it with --experts models/experts.json, or give "
                         "\"activate\" / \"deactivate\" lists")
    d = arts.defaults
    delta = raw.get("delta", d.delta)
    if delta is None:
        raise BadRequest("steering.experts.delta is missing and the server has no default "
                         "(params.yaml expert_steering.delta): add \"delta\": 1.0")
    if not (_is_number(delta) and delta > 0):
        raise BadRequest(f"steering.experts.delta must be a positive number, got {_short(delta)}")
    layers, e, k = shape.moe_layers, shape.n_experts, shape.top_k
    try:
        if explicit:
            act, deact = (check_experts(_pairs(raw.get(key, []), f"steering.experts.{key}"),
                                        layers, e, f"steering.experts.{key}")
                          for key in ("activate", "deactivate"))
            plan = SteeringPlan(tuple(act), tuple(deact), float(delta), {"experts": "request"})
            plan.validate(layers, e, k)
            return plan
        mode = raw.get("mode", d.mode)
        if mode not in MODES:
            raise BadRequest(f"steering.experts.mode must be one of {', '.join(MODES)}, got "
                             f"{_short(mode)}")
        n = raw.get("n", d.n)
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise BadRequest(f"steering.experts.n must be an int >= 1, got {_short(n)}")
        return selection_plan(arts.experts, mode, n, float(delta), d.on_empty, d.ranking,
                              layers, e, k)
    except BadRequest:
        raise
    except ValueError as err:
        raise BadRequest(str(err)) from None


def _mat(raw: object, arts: Artifacts) -> tuple[ActivationSteering | None, dict | None]:
    if raw is None:
        return None, None
    if arts.mat is None:
        raise BadRequest("steering.mat_steer needs a MAT-Steer checkpoint, which this server was "
                         "not started with: restart it with --mat models/mat_steer")
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest('steering.mat_steer must be an object {"attributes": [...], "scale": '
                         "1.0} (or true), got " + _short(raw))
    _known(raw, MAT_KEYS, "steering.mat_steer")
    module, config = arts.mat
    names = raw.get("attributes", config.attributes)
    if not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)):
        raise BadRequest("steering.mat_steer.attributes must be a non-empty list of the "
                         f"checkpoint's attributes {config.attributes}, got {_short(names)}")
    if len(set(names)) != len(names):
        raise BadRequest(f"steering.mat_steer.attributes lists an attribute twice: {names}")
    try:
        idx = attribute_index(config, names)
    except ValueError as err:
        raise BadRequest(f"steering.mat_steer: {err}") from None
    scale = raw.get("scale", 1.0)
    if not _is_number(scale):
        raise BadRequest(f"steering.mat_steer.scale must be a finite number, got {_short(scale)}")
    sub = with_vector_scale(_attributes(module, idx), float(scale))
    info = {"attributes": list(names), "scale": float(scale), "layer": config.layer}
    return ActivationSteering(config.layer, module=sub), info


def _attributes(module: SteeringModule, idx: Sequence[int]) -> SteeringModule:
    """The module's attributes `idx` only, in that order (all of them in checkpoint order: the
    same tensors, so the same edit as the whole checkpoint)."""
    out = SteeringModule(module.hidden_size, len(idx))
    out.load_state_dict({k: v[list(idx)] for k, v in module.state_dict().items()})
    return out.eval()


def _gate(raw: object, arts: Artifacts) -> PromptGate | None:
    if raw is None or raw is False:
        return None
    if not (raw is True or raw in GATE_SOURCES):
        raise BadRequest(f"steering.gate must be true, false or one of {', '.join(GATE_SOURCES)}"
                         f", got {_short(raw)}")
    if not arts.gates:
        raise BadRequest("steering.gate needs a prompt gate, which this server was not started "
                         "with: restart it with --gate models/gate, or leave gate out")
    source = next(iter(arts.gates)) if raw is True else raw
    if source not in arts.gates:
        raise BadRequest(f"steering.gate {source!r}: the server's gate folder has only "
                         f"{', '.join(arts.gates)}")
    return arts.gates[source]


def _pairs(raw: object, where: str) -> list:
    if not isinstance(raw, list):
        raise BadRequest(f"{where} must be a list of [layer, expert] pairs, got {_short(raw)}")
    return raw


def _known(raw: dict, keys: Sequence[str], where: str) -> None:
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise BadRequest(f"{where} has unknown key {unknown[0]!r}: use {', '.join(keys)}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
