"""Runtime steering: a forward hook on one decoder layer, only ever inside a context manager.

The hook rewrites the layer's output hidden states [B, L, D] for every token of every sequence in
the batch (prompt tokens and each generated token alike; with a KV cache the new tokens of each
step are the ones that pass through the layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from steerline.model.arch import check_layer, decoder_layers
from steerline.steering.gated import SteeringModule

SteerFn = Callable[[torch.Tensor], torch.Tensor]  # hidden [..., D] -> steered [..., D]


@contextlib.contextmanager
def steering_hook(model: nn.Module, layer: int, fn: SteerFn | None) -> Iterator[None]:
    """Apply `fn` to the output of decoder layer `layer` inside the block; `fn=None` is a no-op.

    The hook is removed on exit, also when the block raises."""
    if fn is None:
        yield
        return
    check_layer(model, layer)

    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mat_steer_fn(module: SteeringModule) -> SteerFn:
    """The gated, norm-preserving MAT-Steer edit (float32 math, cast back to the input dtype)."""
    return module.steer


def additive_fn(vector: torch.Tensor) -> SteerFn:
    """h -> h + vector (vector [D]); the mean-difference baseline."""
    vector = vector.detach()

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + vector.to(device=hidden.device, dtype=hidden.dtype)

    return fn
