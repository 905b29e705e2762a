"""The MoE feed-forward layer: router + experts (+ shared experts), a drop-in for a transformer MLP."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.experts import Experts
from moezoo.layers.mlp import MLP
from moezoo.layers.routed import RoutedLayer
from moezoo.routers.top_k import TopKRouter

__all__ = ["MoE", "RouterFactory", "resolve_router"]

#: Builds a router for a layer: ``factory(dim, num_experts) -> router``. In YAML, a ``class_path``
#: with ``init_args`` that leave out ``dim`` and ``num_experts``.
RouterFactory = Callable[[int, int], nn.Module]


def resolve_router(owner: str, router: nn.Module | RouterFactory | None, dim: int, num_experts: int,
                   default: Callable[[], nn.Module]) -> nn.Module:
    """The router a layer was given: a module, a factory ``(dim, num_experts) -> router`` (called
    here), or None for ``default()``; its expert count must be the layer's.

    The router's own input size is checked by the router: it may route on other features than the
    layer input (``router_input`` in ``MoE.forward``, e.g. SpeechMoE's shared embedding).
    """
    if router is None:
        router = default()
    elif not isinstance(router, nn.Module):
        router = router(dim, num_experts)
    if getattr(router, "num_experts", num_experts) != num_experts:
        raise ValueError(
            f"{owner}: router is for num_experts={getattr(router, 'num_experts', '?')} but the layer has "
            f"num_experts={num_experts}"
        )
    return router


class MoE(RoutedLayer):
    """Sparse mixture of expert MLPs; ``forward(x: (..., dim)) -> (..., dim)``.

    Usable wherever a transformer MLP goes (e.g. timm's ``mlp_layer``). The router assigns each
    token to experts; the expert bank (:class:`~moezoo.layers.experts.Experts`) computes the
    weighted expert outputs, locally or expert-parallel; an
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
        bfloat16_dispatch: round expert inputs and outputs to bf16, routing and combine in fp32
            (vmoe's ``dispatcher.bfloat16``; see :class:`~moezoo.layers.experts.ExpertBank`).
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
        bfloat16_dispatch: bool = False,
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(aux_loss_weights)
        for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts)):
            require_int("MoE", name, value)
        if shared_experts < 0:
            raise ValueError(f"MoE: shared_experts must be >= 0, got {shared_experts}")
        self.dim, self.hidden = dim, hidden

        self.router = resolve_router("MoE", router, dim, num_experts, lambda: TopKRouter(dim, num_experts, k=2))
        self.experts = Experts(
            dim, hidden, num_experts, activation, gated=gated, bias=bias, dropout=dropout,
            identical_init=identical_init, backend=backend, bfloat16_dispatch=bfloat16_dispatch,
        )
        self.shared = None
        self.shared_gate = None
        if shared_experts:
            self.shared = MLP(dim, shared_experts * (shared_hidden or hidden), activation, gated=gated, bias=bias)
            if shared_gate:
                self.shared_gate = nn.Linear(dim, 1, bias=False)

    @property
    def num_experts(self) -> int:
        """E, the routed experts (owned by the expert bank)."""
        return self.experts.num_experts

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}"

    def forward(self, x: Tensor, token_ids: Tensor | None = None, router_input: Tensor | None = None) -> Tensor:
        """x: (..., dim) -> (..., dim).

        Args:
            token_ids: (x.shape[:-1]) ints for routers that hash token ids.
            router_input: (x.shape[:-1], router dim) features the router sees instead of ``x``.
        """
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE: x must have shape (..., tokens, dim={self.dim}), got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            self.record({}, {})
            return x.clone()
        positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1]).reshape(-1)
        ids = None if token_ids is None else token_ids.reshape(-1)
        if router_input is None:
            route_on = flat
        elif router_input.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"MoE: router_input must have shape {tuple(x.shape[:-1])} + (features,), got {tuple(router_input.shape)}"
            )
        else:
            route_on = router_input.reshape(flat.shape[0], -1)
        routing = self.router(route_on, token_ids=ids, positions=positions)
        out = self.experts(flat, routing)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        self.record(routing.losses, routing.stats, routing.logits)
        return out.view(x.shape)
