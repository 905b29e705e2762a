"""The dense transformer MLP, plain or gated: the baseline and the shared expert of MoE layers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.kernels.activations import get_activation

__all__ = ["MLP"]


class MLP(nn.Module):
    """``fc2(drop(act(fc1(x))))``, or gated ``fc2(drop(act(g) * u))`` with ``[g | u] = fc1(x)``.

    Args:
        dim: input and output size.
        hidden: hidden size (per half when gated).
        activation: "gelu", "gelu_tanh", "silu" or "relu".
        gated: gated linear unit (SwiGLU with "silu").
        bias: biases in both projections.
        dropout: dropout after the activation and (with ``drop_output``) after fc2.
        drop_output: also drop fc2's output; False where the surrounding block drops the residual
            branch itself (the SwitchHead/σ-MoE authors' FFN: ``fc2(drop(act(fc1(x))))``).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        *,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        dim_out: int | None = None,
        drop_output: bool = True,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        self.activation = activation
        self.act = get_activation(activation)
        self.gated = gated
        self.dropout = dropout
        self.drop_output = drop_output
        self.fc1 = nn.Linear(dim, hidden * (2 if gated else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, dim_out or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim_out)."""
        h = self.fc1(x)
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            h = self.act(g) * u
        else:
            h = self.act(h)
        h = F.dropout(h, self.dropout, self.training)
        out = self.fc2(h)
        return F.dropout(out, self.dropout, self.training) if self.drop_output else out
