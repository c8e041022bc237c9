"""The gated steering module and its checkpoint (safetensors + config.json, never pickle).

For a residual-stream activation a [D] and T attributes:
    g_t(a) = sigmoid(w_t . a + b_t)                       gates [T]
    a~     = a + sum_t g_t(a) theta_t                     steered
    a'     = a~ * ||a|| / ||a~||                          norm-preserving
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerline.io import atomic_dir

WEIGHTS_FILE = "steering.safetensors"
CONFIG_FILE = "config.json"
NORM_EPS = 1e-12  # only guards all-zero activations (padding); never changes a nonzero norm


class SteeringModule(nn.Module):
    """T gated steering vectors on a D-dimensional residual stream."""

    def __init__(self, hidden_size: int, n_attributes: int, init_scale: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if hidden_size < 1 or n_attributes < 1:
            raise ValueError(f"need hidden_size >= 1 and n_attributes >= 1, got "
                             f"{hidden_size} and {n_attributes}")
        t, d = n_attributes, hidden_size
        self.steering_vectors = nn.Parameter(torch.randn(t, d, generator=generator) * init_scale)
        self.gate_weight = nn.Parameter(torch.randn(t, d, generator=generator) * init_scale)
        self.gate_bias = nn.Parameter(torch.zeros(t))

    @property
    def hidden_size(self) -> int:
        return self.steering_vectors.shape[1]

    @property
    def n_attributes(self) -> int:
        return self.steering_vectors.shape[0]

    def gate_logits(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [..., D] -> gate logits w_t . a + b_t [..., T]."""
        if acts.dim() == 2:
            return torch.addmm(self.gate_bias, acts, self.gate_weight.T)
        return acts @ self.gate_weight.T + self.gate_bias

    def gates(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [..., D] -> gates [..., T] in (0, 1)."""
        return torch.sigmoid(self.gate_logits(acts))

    def forward(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """acts [..., D] -> (steered [..., D], gates [..., T]), norm-preserving."""
        gates = self.gates(acts)  # [..., T]
        if acts.dim() == 2:  # one fused kernel for the common training case
            shifted = torch.addmm(acts, gates, self.steering_vectors)  # [N, D]
        else:
            shifted = acts + gates @ self.steering_vectors  # [..., D]
        return renormalize(acts, shifted), gates

    @torch.no_grad()
    def steer(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply to a model's hidden states of any dtype/shape [..., D], computed in float32.

        With all steering vectors zero the result is `hidden` bit for bit: the shift adds exact
        zeros and the rescale factor is ||a|| / ||a|| == 1.0 exactly.
        """
        acts = hidden.float()
        steered, _ = self(acts)
        return steered.to(hidden.dtype)


@torch.no_grad()
def with_vector_scale(module: SteeringModule, scale: float) -> SteeringModule:
    """A copy of `module` whose steering vectors are multiplied by `scale` (gates unchanged)."""
    out = SteeringModule(module.hidden_size, module.n_attributes)
    out.load_state_dict(module.state_dict())
    out.steering_vectors.mul_(scale)
    return out.eval()


def renormalize(original: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Rescale `shifted` [..., D] to the per-row L2 norm of `original` [..., D]."""
    num = original.norm(dim=-1, keepdim=True)  # [..., 1]
    den = shifted.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # [..., 1]
    return shifted * (num / den)


@dataclass(frozen=True)
class SteeringConfig:
    attributes: list[str]
    layer: int
    hidden_size: int
    model: str
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"attributes": list(self.attributes), "layer": self.layer,
                "hidden_size": self.hidden_size, "model": self.model, "training": self.training}


def save_steering(module: SteeringModule, config: SteeringConfig, out: str | Path) -> None:
    """Write `out`/steering.safetensors (float32 tensors) and `out`/config.json atomically."""
    if len(config.attributes) != module.n_attributes or config.hidden_size != module.hidden_size:
        raise ValueError(
            f"config ({len(config.attributes)} attributes, hidden {config.hidden_size}) does not "
            f"match the module ({module.n_attributes} attributes, hidden {module.hidden_size})")
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu()
               for k, v in module.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def load_steering(path: str | Path) -> tuple[SteeringModule, SteeringConfig]:
    """Load a checkpoint written by `save_steering`; shapes are checked against config.json."""
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: not a MAT-Steer checkpoint "
                                    "(run the train_steering stage)")
    raw = json.loads((path / CONFIG_FILE).read_text())
    config = SteeringConfig(attributes=list(raw["attributes"]), layer=int(raw["layer"]),
                            hidden_size=int(raw["hidden_size"]), model=str(raw["model"]),
                            training=dict(raw.get("training", {})))
    tensors = load_file(str(path / WEIGHTS_FILE))
    t, d = len(config.attributes), config.hidden_size
    expected = {"steering_vectors": (t, d), "gate_weight": (t, d), "gate_bias": (t,)}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ValueError(f"{path}: tensor shapes {got} do not match config.json {expected}")
    module = SteeringModule(d, t)
    module.load_state_dict(tensors)
    module.eval()
    return module, config


def check_compatible(config: SteeringConfig, hidden_size: int, n_layers: int) -> None:
    """Raise one clear error if a checkpoint cannot be applied to a model of this shape."""
    if config.hidden_size != hidden_size:
        raise ValueError(
            f"steering checkpoint has hidden size {config.hidden_size} (trained on "
            f"{config.model!r}) but the model's hidden size is {hidden_size}: use the model the "
            "steering was trained on, or retrain it on this model")
    if not 0 <= config.layer < n_layers:
        raise ValueError(f"steering checkpoint layer {config.layer} is out of range for a model "
                         f"with {n_layers} layers")


def attribute_index(config: SteeringConfig, names: Sequence[str]) -> list[int]:
    missing = [n for n in names if n not in config.attributes]
    if missing:
        raise ValueError(f"attributes {missing} not in checkpoint ({config.attributes})")
    return [config.attributes.index(n) for n in names]
