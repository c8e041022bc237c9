"""Gated twins of the steered variants: the same expert plan, applied only to the prompts a
prompt gate (steermoe/gating) fires on; the other prompts run unsteered.

The twin `<variant>_gated` shares every request with its ungated twin (gate fired) or with the
unsteered model (gate closed), so it costs no generation of its own (backend_answers runs each
distinct request once) and its perplexity is composed from the two per-row NLLs. Their goals:
steermoe.safety.goals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steerline.steering.experts import SteeringPlan

SUFFIX = "_gated"


@dataclass(frozen=True)
class GatedPlan:
    plan: SteeringPlan  # the ungated twin's plan, the same object
    fires: np.ndarray  # [N prompts] bool, in the eval prompts' order
    source: str  # the gate's feature source

    def for_prompt(self, i: int) -> SteeringPlan | None:
        return self.plan if self.fires[i] else None


def twin_of(name: str) -> str | None:
    """The ungated variant of a gated one (None: not gated)."""
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else None


def compose_ppl(fires: np.ndarray, on: tuple[np.ndarray, np.ndarray],
                off: tuple[np.ndarray, np.ndarray]) -> float:
    """Perplexity when each reference row is scored steered (`on` rows: nll, n tokens) where the
    gate fires and unsteered (`off`) where it does not; the token counts are the same answers'."""
    nll = np.where(fires, on[0], off[0])
    return float(np.exp(nll.sum() / on[1].sum()))
