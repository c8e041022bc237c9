"""Steering requests shared by every backend: SteerMoE expert steering and activation steering.

The rules live beside it and are reused, never restated: expert steering is
`steerline.steering.experts` (its `SteeringPlan` says which experts, its `steer_scores`
is the router edit), activation steering is `steerline.steering.residual` (the gated,
norm-preserving module of `steering.gated`, or an additive mean-difference vector).
`steerline.mat_steer.checkpoint.activation_steering` makes one from a trained checkpoint.

A `Steering` travels to vLLM workers as plain JSON-able data (`to_wire` / `from_wire`: lists and
numbers, never objects); its `plan_id` is a content hash, so equal requests share one id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerline.steering.experts import SteeringPlan
from steerline.steering.gated import SteeringModule
from steerline.steering.residual import SteerFn, additive_fn, mat_steer_fn


@dataclass(frozen=True, eq=False)
class ActivationSteering:
    """Steering of the residual stream after decoder layer `layer`, on every token of a request:
    a MAT-Steer module, or (`vector`) the additive mean-difference baseline."""

    layer: int
    module: SteeringModule | None = None
    vector: torch.Tensor | None = None  # [D]

    def __post_init__(self) -> None:
        if (self.module is None) == (self.vector is None):
            raise ValueError("activation steering needs exactly one of a MAT-Steer module or an "
                             "additive vector")
        if self.layer < 0:
            raise ValueError(f"steering layer must be >= 0, got {self.layer}")
        if self.vector is not None:
            object.__setattr__(self, "vector", self.vector.detach().float().cpu().reshape(-1))

    @property
    def hidden_size(self) -> int:
        return self.module.hidden_size if self.module is not None else int(self.vector.numel())

    def check(self, hidden_size: int, n_layers: int) -> None:
        if self.hidden_size != hidden_size:
            raise ValueError(f"activation steering has hidden size {self.hidden_size} but the "
                             f"model's is {hidden_size}")
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"activation steering layer {self.layer} is out of range for a "
                             f"model with {n_layers} decoder layers")

    def fn(self, device: torch.device | str) -> SteerFn:
        """The edit of the residual stream [..., D], from steerline.steering.residual."""
        if self.module is not None:
            return mat_steer_fn(self.module.to(device).eval())
        return additive_fn(self.vector.to(device))

    def to_wire(self) -> dict[str, Any]:
        if self.module is None:
            return {"layer": self.layer, "vector": self.vector.tolist()}
        return {"layer": self.layer,
                "mat_steer": {k: v.detach().float().cpu().tolist()
                              for k, v in self.module.state_dict().items()}}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ActivationSteering:
        if "vector" in raw:
            return cls(int(raw["layer"]), vector=torch.tensor(raw["vector"]))
        state = {k: torch.tensor(v, dtype=torch.float32) for k, v in raw["mat_steer"].items()}
        t, d = state["steering_vectors"].shape
        module = SteeringModule(d, t)
        module.load_state_dict(state)
        return cls(int(raw["layer"]), module=module.eval())


@dataclass(frozen=True, eq=False)
class Steering:
    """What to steer for one request: experts (an expert_steering plan), the residual stream,
    or both."""

    experts: SteeringPlan | None = None
    activation: ActivationSteering | None = None
    _id: list[str] = field(default_factory=list, repr=False)

    @property
    def is_noop(self) -> bool:
        return (self.experts is None or self.experts.empty) and self.activation is None

    def to_wire(self) -> dict[str, Any]:
        return {"experts": None if self.experts is None else self.experts.to_json(),
                "activation": None if self.activation is None else self.activation.to_wire()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Steering:
        exp = raw["experts"]
        plan = None if exp is None else SteeringPlan(
            tuple(tuple(p) for p in exp["activate"]), tuple(tuple(p) for p in exp["deactivate"]),
            None if exp["delta"] is None else float(exp["delta"]), dict(exp.get("source", {})))
        act = raw["activation"]
        return cls(plan, None if act is None else ActivationSteering.from_wire(act))

    @property
    def plan_id(self) -> str:
        if not self._id:  # cached: the vectors are hashed once per object
            blob = json.dumps(self.to_wire(), sort_keys=True).encode()
            self._id.append(hashlib.sha256(blob).hexdigest()[:16])
        return self._id[0]


SteeringArg = Steering | Sequence[Steering | None] | None


def per_prompt(steering: SteeringArg, n: int) -> list[Steering | None]:
    """One Steering (or None) per prompt from None, one for all, or a list; no-ops -> None."""
    if steering is None or isinstance(steering, Steering):
        plans: list[Steering | None] = [steering] * n
    else:
        plans = list(steering)
        if len(plans) != n:
            raise ValueError(f"got {len(plans)} steering requests for {n} prompts")
    return [None if p is None or p.is_noop else p for p in plans]
