"""The backend interface: greedy generation and generation-with-routing-capture, each with
optional steering plans (one for all prompts, or one per prompt).

Implemented by `TransformersBackend` (the reference, used for exact checks) and `VLLMBackend`
(the production backend). Both return the same types: `Generated` for plain generation and
`steerline.steering.capture.Routed` (prompt + answer tokens with their routing) for capture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoConfig, GenerationConfig

from steerline.core.chat import ChatPrompt
from steerline.steering.capture import Routed
from steerline.steering.request import SteeringArg

Prompt = ChatPrompt | Sequence[int]  # a rendered chat prompt, or plain token ids


def prompt_ids(prompt: Prompt) -> list[int]:
    return list(prompt.ids) if isinstance(prompt, ChatPrompt) else [int(t) for t in prompt]


@dataclass
class Generated:
    """One prompt's greedy answer."""

    token_ids: np.ndarray  # [n_generated] int32, the answer only
    finished: bool  # ended on an end-of-sequence token (not on max_new_tokens)


class Backend(ABC):
    """Greedy generation (optionally steered, optionally capturing routing) over many prompts.

    `steering`: one Steering for every prompt, or one (or None) per prompt."""

    name: str = "?"
    n_layers: int = 0  # MoE layers (0 for a dense model)
    moe_layers: tuple[int, ...] = ()  # the decoder-layer index of each MoE layer
    top_k: int = 0
    n_experts: int = 0
    max_context: int = 1 << 30

    @abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int, steering: SteeringArg = None
    ) -> list[Generated]:
        """Greedy answers, in prompt order."""

    @abstractmethod
    def generate_and_capture(
        self, prompts: Sequence[ChatPrompt], max_new_tokens: int, steering: SteeringArg = None
    ) -> list[Routed]:
        """Greedy answers and the top-k routing of every prompt and answer token (the last
        answer token included), in prompt order; steered routing when a plan edits experts."""

    def close(self) -> None:  # noqa: B027 (only engines hold something to release)
        """Release the engine."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eos_token_ids(model_path: str | Path) -> list[int]:
    """End-of-sequence ids the way the transformers backend stops: generation_config.json's
    eos_token_id, else config.json's. Passed explicitly to vLLM as stop_token_ids so both
    backends stop on the same tokens whatever the engine's own defaults."""
    eos = None
    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:
        pass
    if eos is None:
        eos = AutoConfig.from_pretrained(str(model_path)).eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return sorted({int(i) for i in ids if i is not None})
