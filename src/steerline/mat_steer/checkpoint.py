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
from safetensors import SafetensorError
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
    """Load a checkpoint written by `save_steering`, checked before use: config.json an object
    with each key of its type, the safetensors file complete, its tensors finite and of the
    shapes config.json gives; anything else is one ValueError naming the file."""
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: not a MAT-Steer checkpoint "
                                    "(run the train_steering stage)")
    fix = "rerun the train_steering stage (dvc repro train_steering) that writes it"
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError name no file
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({err}): {fix}") from None
    problem = _config_problem(raw)
    if problem is not None:
        raise ValueError(f"{path / CONFIG_FILE} {problem}: {fix}")
    config = SteeringConfig(attributes=raw["attributes"], layer=raw["layer"],
                            hidden_size=raw["hidden_size"], model=raw["model"],
                            training=raw.get("training", {}))
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except SafetensorError as err:  # a cut or overwritten file
        raise ValueError(f"{path / WEIGHTS_FILE} is truncated or corrupt ({err}): {fix}") from None
    t, d = len(config.attributes), config.hidden_size
    expected = {"steering_vectors": (t, d), "gate_weight": (t, d), "gate_bias": (t,)}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ValueError(f"{path}: tensor shapes {got} do not match config.json {expected}: "
                         f"{fix}")
    if not all(torch.isfinite(v).all() for v in tensors.values()):
        raise ValueError(f"{path / WEIGHTS_FILE} holds NaN or infinite values: {fix}")
    module = SteeringModule(d, t)
    module.load_state_dict(tensors)
    module.eval()
    return module, config


def _config_problem(raw: object) -> str | None:
    """What is wrong with a checkpoint's config.json (None: nothing), as the rest of a
    sentence."""
    if not isinstance(raw, dict):
        return f"is a JSON {type(raw).__name__}, not an object"
    missing = [k for k in ("attributes", "layer", "hidden_size", "model") if k not in raw]
    if missing:
        return f"lacks {', '.join(missing)}"
    attributes = raw["attributes"]
    if not (isinstance(attributes, list) and attributes
            and all(isinstance(a, str) for a in attributes)):
        return f"has attributes {attributes!r}, not a non-empty list of names"
    for key, low in (("layer", 0), ("hidden_size", 1)):
        v = raw[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            return f"has {key} {v!r}, not an int >= {low}"
    if not isinstance(raw["model"], str):
        return f"has model {raw['model']!r}, not a path"
    if not isinstance(raw.get("training", {}), dict):
        return "has a training entry that is not an object"
    return None


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
