"""Soft MoE (Puigcerver et al. 2023): every slot is a weighted average of all tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.experts import Experts, round_to_bfloat16
from moezoo.layers.routed import RoutedLayer
from moezoo.routers.functional import soft_moe_weights
from moezoo.routers.routing import Routing

__all__ = ["SoftMoE"]


class SoftMoE(RoutedLayer):
    """``forward(x: (groups, tokens, dim)) -> (groups, tokens, dim)``; in a ViT a group is one image.

    Dispatch and combine weights come from :func:`moezoo.routers.functional.soft_moe_weights`
    (L2-normalised tokens and slot parameters ``mu``, a learned ``scale``, as vmoe's ``SoftRouter``).
    Slot inputs mix the **un-normalised** tokens with the dispatch weights; expert e processes its
    ``slots_per_expert`` slots; each token's output mixes all slot outputs with its combine weights.
    No tokens are dropped and there is no auxiliary loss.

    Args:
        dim: model width.
        hidden: hidden width of each expert MLP.
        num_experts: E.
        slots_per_expert: p (paper default 1).
        activation, gated, bias, dropout, backend: the expert MLPs (see
            :class:`~moezoo.layers.experts.Experts`).
        bfloat16_dispatch: vmoe's ``SoftRouter`` numerics: the tokens are rounded to bf16 before they
            are mixed into slots and the expert outputs before they are combined; the mixing and
            combine weights and sums stay fp32. (The rounding is per token, before the mixing, so
            the layer does it rather than the expert bank, whose option rounds each routed row.)
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        bfloat16_dispatch: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.slots_per_expert = dim, require_int("SoftMoE", "slots_per_expert", slots_per_expert)
        self.experts = Experts(dim, hidden, num_experts, activation, gated=gated, bias=bias, dropout=dropout,
                               backend=backend)
        self.bfloat16_dispatch = bool(bfloat16_dispatch)
        self.mu = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        # flax lecun_normal, as the reference initialises mu.
        std = 1.0 / math.sqrt(dim) / 0.87962566103423978
        nn.init.trunc_normal_(self.mu, std=std, a=-2 * std, b=2 * std)

    @property
    def num_experts(self) -> int:
        """E (owned by the expert bank)."""
        return self.experts.num_experts

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (groups, tokens, dim) -> same shape."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SoftMoE: x must have shape (groups, tokens, dim={self.dim}), got {tuple(x.shape)}")
        groups, tokens, _ = x.shape
        dispatch, combine = soft_moe_weights(x, self.mu, self.scale)  # (G, M, E, P) each
        dispatch, combine = dispatch.to(x.dtype), combine.to(x.dtype)
        tokens_in = round_to_bfloat16(x) if self.bfloat16_dispatch else x
        slots = torch.einsum("gmd,gmep->gepd", tokens_in, dispatch).reshape(-1, self.dim)
        # Each slot row is one assignment to its own expert with weight 1.
        num_slots = slots.shape[0]
        expert = torch.arange(self.num_experts, device=x.device).repeat_interleave(self.slots_per_expert)
        routing = Routing(
            token=torch.arange(num_slots, device=x.device),
            expert=expert.repeat(groups),
            weight=torch.ones(num_slots, device=x.device, dtype=torch.float32),
            num_tokens=num_slots,
            num_experts=self.num_experts,
        )
        outputs = self.experts(slots, routing).view(groups, self.num_experts, self.slots_per_expert, self.dim)
        if self.bfloat16_dispatch:
            outputs = round_to_bfloat16(outputs)
        y = torch.einsum("gepd,gmep->gmd", outputs, combine)
        with torch.no_grad():
            # An expert's "load" is the token mass it returns: its share of every token's combine weights.
            self.record({}, {
                "tokens_per_expert": combine.float().sum(dim=(0, 1, 3)),
                "combine_entropy": -(combine.float() * combine.float().clamp_min(1e-20).log()).sum((2, 3)).mean(),
            })
        return y
