"""A MAT-Steer checkpoint: safetensors + config.json, never pickle, and applying it to a model.

The gated module itself is steerline.steering.gated.SteeringModule.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerline.core.io import atomic_dir
from steerline.model.arch import decoder_layers
from steerline.steering.gated import SteeringModule
from steerline.steering.request import ActivationSteering
from steerline.steering.residual import mat_steer_fn, steering_hook

WEIGHTS_FILE = "steering.safetensors"
CONFIG_FILE = "config.json"


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


def activation_steering(path: str | Path) -> ActivationSteering:
    """A backend steering request from a checkpoint directory (models/mat_steer)."""
    module, config = load_steering(path)
    return ActivationSteering(config.layer, module=module)


@contextlib.contextmanager
def mat_steering(model: nn.Module, module: SteeringModule,
                 config: SteeringConfig) -> Iterator[None]:
    """Apply a trained MAT-Steer checkpoint to `model` inside the block (shape-checked)."""
    check_compatible(config, model.config.hidden_size, len(decoder_layers(model)))
    module = module.to(next(model.parameters()).device)
    with steering_hook(model, config.layer, mat_steer_fn(module)):
        yield
