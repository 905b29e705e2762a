"""The MoE feed-forward layer: router + experts (+ shared experts), a drop-in for a transformer MLP."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from moezoo.kernels import BACKENDS, expert_mlp, get_activation
from moezoo.layers.mlp import MLP
from moezoo.layers.routed import RoutedLayer
from moezoo.routers.top_k import TopKRouter

__all__ = ["MoE", "RouterFactory"]

#: Builds a router for a layer: ``factory(dim, num_experts) -> router``. In YAML, a ``class_path``
#: with ``init_args`` that leave out ``dim`` and ``num_experts``.
RouterFactory = Callable[[int, int], nn.Module]


class MoE(RoutedLayer):
    """Sparse mixture of expert MLPs; ``forward(x: (..., dim)) -> (..., dim)``.

    Usable wherever a transformer MLP goes (e.g. timm's ``mlp_layer``). The router assigns each
    token to experts; :func:`moezoo.kernels.expert_mlp` computes the weighted expert outputs; an
    optional always-on shared expert is added (sigmoid-gated per token with ``shared_gate``, as in
    Qwen-MoE and Time-MoE). After each forward the router's losses and stats are on
    ``last_losses`` / ``last_stats`` (see :func:`moezoo.layers.aux_loss`).

    Args:
        dim: model width.
        hidden: hidden width of each expert.
        num_experts: E.
        router: a router module, or a factory ``(dim, num_experts) -> router``; default
            ``TopKRouter(dim, num_experts, k=2)``.
        shared_experts: number of always-on experts (implemented as one MLP of
            ``shared_experts * shared_hidden`` hidden units).
        shared_hidden: hidden width of each shared expert (default ``hidden``).
        shared_gate: multiply the shared expert's output by ``sigmoid(x @ w)`` per token.
        activation: expert activation ("gelu", "gelu_tanh", "silu", "relu").
        gated: gated (GLU) experts, SwiGLU with "silu".
        bias: biases in the expert projections.
        dropout: expert dropout (on the hidden activation and expert output), ST-MoE/V-MoE style.
        identical_init: initialise every expert identically (V-MoE), not independently.
        backend: expert-computation backend ("auto", "torch", "triton").
        aux_loss_weights: coefficient per auxiliary-loss name (e.g. ``{"load_balancing": 0.01}``).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 8,
        router: nn.Module | RouterFactory | None = None,
        *,
        shared_experts: int = 0,
        shared_hidden: int | None = None,
        shared_gate: bool = False,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        identical_init: bool = False,
        backend: str = "auto",
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(aux_loss_weights)
        for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoE: {name} must be an int >= 1, got {value!r}")
        if shared_experts < 0:
            raise ValueError(f"MoE: shared_experts must be >= 0, got {shared_experts}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MoE: dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"MoE: backend must be one of {BACKENDS}, got {backend!r}")
        get_activation(activation)
        self.dim, self.hidden, self.num_experts = dim, hidden, num_experts
        self.activation, self.gated, self.dropout, self.backend = activation, gated, dropout, backend

        if router is None:
            router = TopKRouter(dim, num_experts, k=2)
        elif not isinstance(router, nn.Module):
            router = router(dim, num_experts)
        if getattr(router, "num_experts", num_experts) != num_experts or getattr(router, "dim", dim) != dim:
            raise ValueError(
                f"MoE: router is for dim={getattr(router, 'dim', '?')}, num_experts="
                f"{getattr(router, 'num_experts', '?')} but the layer has dim={dim}, num_experts={num_experts}"
            )
        self.router = router

        width = hidden * (2 if gated else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.identical_init = identical_init
        self.reset_expert_parameters()

        self.shared = None
        self.shared_gate = None
        if shared_experts:
            self.shared = MLP(dim, shared_experts * (shared_hidden or hidden), activation, gated=gated, bias=bias)
            if shared_gate:
                self.shared_gate = nn.Linear(dim, 1, bias=False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation}, gated={self.gated}, backend={self.backend}"
        )

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
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

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """x: (..., dim) -> (..., dim). ``token_ids`` (x.shape[:-1]) feeds routers that hash ids."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE: x must have shape (..., dim={self.dim}), got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            self.record({}, {})
            return x.clone()
        seq = x.shape[-2] if x.dim() >= 2 else 1
        positions = torch.arange(seq, device=x.device).expand(x.shape[:-1]).reshape(-1)
        ids = None if token_ids is None else token_ids.reshape(-1)
        routing = self.router(flat, token_ids=ids, positions=positions)
        out = expert_mlp(
            flat,
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
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        self.record(routing.losses, routing.stats)
        return out.view(x.shape)
