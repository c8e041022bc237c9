"""The gated steering edit of a residual stream (MAT-Steer's form), as a torch module.

For a residual-stream activation a [D] and T attributes:
    g_t(a) = sigmoid(w_t . a + b_t)                       gates [T]
    a~     = a + sum_t g_t(a) theta_t                     steered
    a'     = a~ * ||a|| / ||a~||                          norm-preserving

The method that learns it is steerline.mat_steer; backends apply it through
steerline.steering.residual without knowing how it was trained.
"""

from __future__ import annotations

import torch
from torch import nn

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
