"""A bank of expert MLPs stored as stacked tensors, run through :func:`moezoo.kernels.expert_mlp`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moezoo.kernels import BACKENDS, expert_mlp, get_activation
from moezoo.routers.routing import Routing

__all__ = ["Experts"]


class Experts(nn.Module):
    """E expert MLPs ``mlp_e(v) = act(v @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated: ``act(g) * u``).

    Parameters: ``w_in`` (E, dim, hidden or 2*hidden), ``b_in`` (E, width), ``w_out`` (E, hidden, dim),
    ``b_out`` (E, dim). Every MoE-style layer holds its experts in one of these, so there is one
    expert computation, one initialisation and one dense-to-expert copy.

    Args:
        num_experts: E.
        dim: input and output width.
        hidden: hidden width of each expert.
        activation: "gelu", "gelu_tanh", "silu" or "relu".
        gated: gated (GLU) experts; SwiGLU with "silu".
        bias: biases in both projections.
        dropout: expert dropout (hidden activation and output), training only.
        identical_init: every expert starts as a copy of expert 0.
        backend: "auto", "torch" or "triton".
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        *,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        identical_init: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Experts: {name} must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Experts: dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"Experts: backend must be one of {BACKENDS}, got {backend!r}")
        get_activation(activation)
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation, self.gated, self.dropout, self.backend = activation, gated, dropout, backend
        width = hidden * (2 if gated else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.identical_init = identical_init
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation}, gated={self.gated}, backend={self.backend}"
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert as ``nn.Linear`` initialises itself: U(±1/sqrt(fan_in)) weights and biases."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)
        if self.identical_init:
            self.copy_expert_to_all(0)

    @torch.no_grad()
    def copy_expert_to_all(self, index: int) -> None:
        """Make every expert a copy of expert ``index``."""
        for p in (self.w_in, self.w_out, self.b_in, self.b_out):
            if p is not None:
                p.copy_(p[index : index + 1].expand_as(p))

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Copy a dense MLP's two ``nn.Linear`` layers into every expert (sparse upcycling)."""
        if fc1.weight.shape != (self.w_in.shape[2], self.dim) or fc2.weight.shape != (self.dim, self.hidden):
            raise ValueError(
                f"load_dense: fc1 {tuple(fc1.weight.shape)} / fc2 {tuple(fc2.weight.shape)} do not match "
                f"experts of dim={self.dim}, hidden={self.hidden}, gated={self.gated}"
            )
        if (fc1.bias is None) != (self.b_in is None) or (fc2.bias is None) != (self.b_out is None):
            raise ValueError("load_dense: the dense MLP and the experts disagree on biases")
        self.w_in.copy_(fc1.weight.t().unsqueeze(0).expand_as(self.w_in))
        self.w_out.copy_(fc2.weight.t().unsqueeze(0).expand_as(self.w_out))
        if self.b_in is not None:
            self.b_in.copy_(fc1.bias.unsqueeze(0).expand_as(self.b_in))
            self.b_out.copy_(fc2.bias.unsqueeze(0).expand_as(self.b_out))

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: (tokens, dim) -> (tokens, dim), the routing-weighted sum of expert outputs."""
        return expert_mlp(
            x,
            routing,
            self.w_in,
            self.w_out,
            self.activation,
            b_in=self.b_in,
            b_out=self.b_out,
            gated=self.gated,
            dropout=self.dropout,
            training=self.training,
            backend=self.backend,
        )
