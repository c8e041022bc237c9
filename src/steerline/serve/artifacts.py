"""What a server may apply, loaded and checked once at start: the selected experts
(models/experts.json), a MAT-Steer checkpoint, the prompt gates of a train_gate folder, and the
expert_steering defaults a request may leave out. A request naming anything not loaded here is
refused (HTTP 400); a broken artifact stops the server before it listens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pandas as pd
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from steerline.core.params import OnEmptySelection
from steerline.mat_steer.checkpoint import SteeringConfig, check_compatible, load_steering
from steerline.steering.experts import MODES, read_experts_json
from steerline.steering.gated import SteeringModule
from steerline.steermoe.gating.prompt_gate import PromptGate, load_gate

GATE_SOURCES = ("residual", "routing")  # the train_gate sources; the first found is the default
ON_EMPTY: tuple[str, ...] = get_args(OnEmptySelection)  # the schema's on_empty_selection


@dataclass(frozen=True)
class ExpertDefaults:
    """expert_steering values for requests that leave them out (None: the request must give
    it), and what an empty experts.json list means (as the pipeline's on_empty_selection)."""

    mode: str | None = None
    n: int | None = None
    delta: float | None = None
    on_empty: str = "error"
    risk_diff: Path | None = None  # the ranking on_empty "risk_diff_ranking" steers

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"expert_steering mode must be one of {', '.join(MODES)}, got "
                             f"{self.mode!r}")
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty_selection must be one of {', '.join(ON_EMPTY)}, got "
                             f"{self.on_empty!r}")

    def ranking(self) -> pd.DataFrame:
        if self.risk_diff is None or not self.risk_diff.is_file():
            raise ValueError(f"the risk_diff ranking {self.risk_diff} the empty-selection "
                             "fallback reads is missing: run `dvc repro risk_diff`")
        return pd.read_parquet(self.risk_diff)


@dataclass
class Artifacts:
    defaults: ExpertDefaults = field(default_factory=ExpertDefaults)
    experts: dict[str, Any] | None = None  # experts.json: {"unsafe": [[l, e], ...], "safe": ...}
    mat: tuple[SteeringModule, SteeringConfig] | None = None
    gates: dict[str, PromptGate] = field(default_factory=dict)  # source -> gate
    # the transformers model the gates score prompts on (an unsteered prefill, as `steerline
    # generate --gate` and the answer_safety stages score them); loaded only with gates
    gate_model: tuple[nn.Module, PreTrainedTokenizerBase] | None = None
    names: dict[str, str] = field(default_factory=dict)  # artifact -> the path it came from


def load_artifacts(model: str | Path, experts: str | Path | None = None,
                   mat: str | Path | None = None, gate: str | Path | None = None,
                   defaults: ExpertDefaults | None = None, dtype: str = "float32") -> Artifacts:
    """Every artifact the server was started with, checked against `model`'s config."""
    arts = Artifacts(defaults or ExpertDefaults())
    if experts is not None:
        arts.experts = read_experts_json(experts)
        arts.names["experts"] = str(experts)
    if mat is not None:
        module, config = load_steering(mat)
        cfg = AutoConfig.from_pretrained(str(model))
        check_compatible(config, int(cfg.hidden_size), int(cfg.num_hidden_layers))
        arts.mat = (module, config)
        arts.names["mat_steer"] = str(mat)
    if gate is not None:
        folder = Path(gate)
        found = [s for s in GATE_SOURCES if (folder / f"{s}.json").is_file()]
        if not found:
            raise ValueError(f"no prompt gate in {folder} (residual.json or routing.json): run "
                             "the train_gate stage or pass another --gate folder")
        arts.gates = {s: load_gate(folder, s) for s in found}
        from steerline.model.load import load_moe  # the weights: only when gates need them

        # on the host: the server's vLLM engine holds the GPU (gpu_memory_utilization)
        arts.gate_model = load_moe(model, dtype, device="cpu")
        arts.names["gate"] = str(folder)
    return arts
