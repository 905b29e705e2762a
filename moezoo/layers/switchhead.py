"""SwitchHead attention (Csordás, Piękos, Irie, Schmidhuber, arXiv 2312.07987): few heads whose value
and output projections are σ-gated mixtures of experts.

Reference: RobertCsordas/switchhead ``switchhead/switchhead.py`` (``SwitchHeadRope``). The expert
projections are :class:`~moezoo.layers.experts.LinearExperts` banks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.attention import RotaryEmbedding, attention_mask, attention_source
from moezoo.layers.experts import LinearExperts
from moezoo.layers.routed import RoutedLayer
from moezoo.routers.losses import marginal_entropy_loss
from moezoo.routers.routing import Routing
from moezoo.routers.switchhead import SwitchHeadSelector

__all__ = ["SwitchHeadAttention"]


class SwitchHeadAttention(RoutedLayer):
    """SwitchHead: ``forward(x: (B, T, dim), memory=None) -> (B, T, dim)``.

    H heads (few: 2-4). Per head h, the query and key projections are dense; the value and output
    projections are E experts each, chosen per head by non-competitive σ-gating
    (:class:`~moezoo.routers.switchhead.SwitchHeadSelector`): the value experts from the **source**
    (key/value-side) token, the output experts from the **destination** (query-side) token::

        V^h(s) = sum_{e in topk(s_V)} s_V[e] * x_s W_V^{h,e}
        A^h    = softmax(Q^h K^h^T / sqrt(d) + mask)
        y(t)   = sum_h sum_{e in topk(s_O)} s_O[e] * (A^h V^h)(t) W_O^{h,e}

    with top-k scores used as weights without renormalisation and the heads summed (no
    concatenation). Q and K are each scaled by ``d^-1/4``; RoPE on the first ``rotate_fraction`` of
    the head channels (the reference's ``SwitchHeadRope``). With ``num_experts=1`` the value
    projection is dense and each head's output is gated by ``sigmoid(x W_sel_O^h)``, as the
    reference's one-expert case.

    Regularisation: none in the paper (``perplexity_reg 0``, expert dropout 0 in every SwitchHead
    sweep). Available as in the reference code: ``expert_dropout`` and the selection-entropy loss
    ``entropy_reg`` (σ-MoE's marginal entropy of the V and O selection logits, per sequence over its
    positions and heads; weight it with ``aux_loss_weights={"entropy_reg": ...}``).

    Parameters: ``q.weight``, ``k_proj.weight`` (H*d, dim); ``v`` = ``v_experts.weight`` (H*E, dim, d);
    ``o`` = ``o_experts.weight`` (H*E, d, dim); ``sel_v.gate.weight`` (H*E, dim, absent for E=1);
    ``sel_o.gate.weight`` (H*E, dim). Expert h*E+e is expert e of head h.

    Args:
        dim: model width.
        num_heads: H.
        num_experts: E per head (paper: 4-8).
        head_dim: d (default dim // num_heads).
        k: experts per head and token (paper: 2-4).
        dropout: dropout on the queries (reference).
        expert_dropout: selection dropout (reference; paper 0).
        rotate_fraction: share of head channels with RoPE (reference 0.5); 0 = no positions here.
        rope_base: RoPE base.
        init_scale: std multiplier of the init (reference recommendation 1/sqrt(layers)).
        backend: backend of the expert projections.
        aux_loss_weights: coefficient per loss name (default none: the paper uses no regulariser).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        num_experts: int = 4,
        head_dim: int | None = None,
        k: int = 2,
        *,
        dropout: float = 0.0,
        expert_dropout: float = 0.0,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000.0,
        init_scale: float = 1.0,
        backend: str = "auto",
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(aux_loss_weights)
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_experts", num_experts), ("k", k)):
            require_int("SwitchHeadAttention", name, value)
        if k > num_experts:
            raise ValueError(f"SwitchHeadAttention: k must be <= num_experts={num_experts}, got k={k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SwitchHeadAttention: dropout must be in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.num_experts, self.k = dim, num_heads, num_experts, k
        self.head_dim = head_dim or dim // num_heads
        if self.head_dim < 1:
            raise ValueError(f"SwitchHeadAttention: head_dim must be >= 1, got {head_dim} (dim={dim}, heads={num_heads})")
        self.dropout = dropout
        inner = num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_experts = LinearExperts(dim, self.head_dim, num_heads * num_experts, backend=backend)
        self.o_experts = LinearExperts(self.head_dim, dim, num_heads * num_experts, backend=backend)
        selector = dict(k=k, expert_dropout=expert_dropout, init_scale=init_scale)
        self.sel_v = SwitchHeadSelector(dim, num_heads, num_experts, **selector) if num_experts > 1 else None
        self.sel_o = SwitchHeadSelector(dim, num_heads, num_experts, **selector)
        self.rope = RotaryEmbedding(self.head_dim, rotate_fraction, rope_base)
        self.reset_parameters(init_scale)

    @property
    def v(self) -> nn.Parameter:
        """(H*E, dim, d) value experts."""
        return self.v_experts.weight

    @property
    def o(self) -> nn.Parameter:
        """(H*E, d, dim) output experts."""
        return self.o_experts.weight

    def expert_parameters(self) -> list[tuple[nn.Parameter, float]]:
        """Each head's value and output experts: k of E active per token and head."""
        return [(p, self.k / self.num_experts) for p in (*self.v_experts.parameters(), *self.o_experts.parameters())]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_experts={self.num_experts}, k={self.k}, "
                f"head_dim={self.head_dim}")

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        """The reference's init: N(0, s/sqrt(dim)) for q, k, v; N(0, s/sqrt(H*d)) for o."""
        for w in (self.q.weight, self.k_proj.weight, self.v):
            w.normal_(0.0, init_scale / math.sqrt(self.dim))
        self.o.normal_(0.0, init_scale / math.sqrt(self.num_heads * self.head_dim))
        for selector in (self.sel_v, self.sel_o):
            if selector is not None:
                selector.reset_parameters(init_scale)

    @property
    def attention_matrices(self) -> int:
        """Attention maps computed per sequence: one per head."""
        return self.num_heads

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal: bool = False,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim) queries; memory: (B, S, dim) keys/values (default x, self-attention).

        ``causal`` and ``key_padding_mask`` (B, S) as :func:`~moezoo.layers.attention.attention_mask`.
        """
        src = attention_source("SwitchHeadAttention", x, memory, self.dim, self.dim)
        (batch, queries, _), keys = x.shape, src.shape[1]
        heads, d = self.num_heads, self.head_dim
        x_flat, src_flat = x.reshape(-1, self.dim), src.reshape(-1, self.dim)
        scale = d ** -0.25  # on q and on k: the product carries 1/sqrt(d)
        q = (self.q(x) * scale).view(batch, queries, heads, d).transpose(1, 2)
        k = (self.k_proj(src) * scale).view(batch, keys, heads, d).transpose(1, 2)

        # Values: rows s*H + h of the source repeated per head, one expert bank for all heads.
        per_head_src = src_flat.repeat_interleave(heads, dim=0)
        if self.sel_v is None:
            rows = torch.arange(per_head_src.shape[0], device=x.device)
            v_routing = Routing(rows, rows % heads, x.new_ones(rows.shape), rows.numel(), heads)
        else:
            v_routing = self.sel_v(src_flat)
        v = self.v_experts(per_head_src, v_routing).view(batch, keys, heads, d).transpose(1, 2)

        q = F.dropout(q, self.dropout, self.training)
        q, k = self.rope(q, k)
        mask = attention_mask(batch, queries, keys, causal, key_padding_mask, x.device)
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, T, d)

        o_routing = self.sel_o(x_flat)
        rows = res.transpose(1, 2).reshape(-1, d)  # row t*H + h
        out = self.o_experts(rows, o_routing).view(batch * queries, heads, self.dim).sum(1)

        # Reference regulariser: per sequence, one marginal over its positions and heads, V and O.
        e = self.num_experts
        losses = {"entropy_reg": sum(marginal_entropy_loss(r.logits.view(batch, -1, e))
                                     for r in (v_routing, o_routing) if r.logits is not None)}
        stats = dict(o_routing.stats)
        if self.sel_v is not None:
            stats["tokens_per_expert_v"] = v_routing.stats["tokens_per_expert"]
        self.record(losses, stats)
        return out.view(batch, queries, self.dim)
