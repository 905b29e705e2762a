"""SwitchHead attention (Csordás, Piękos, Irie, Schmidhuber, arXiv 2312.07987): few heads whose value
and output projections are σ-gated mixtures of experts.

References: RobertCsordas/switchhead ``switchhead/switchhead.py`` (``SwitchHeadRope``, RoPE) and the
authors' training code RobertCsordas/moe_attention ``layers/transformer/full_moe_relative_attention.py``
(``FullMoeRelativeAttention``, Transformer-XL positions with segment memory: the papers' main results).
The expert projections are :class:`~moezoo.layers.experts.LinearExperts` banks.
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
from moezoo.layers.relative_attention import relative_offsets, relative_position_logits, sinusoidal_embedding
from moezoo.layers.routed import RoutedLayer
from moezoo.routers.losses import marginal_entropy_loss
from moezoo.routers.routing import Routing
from moezoo.routers.switchhead import SwitchHeadSelector

__all__ = ["SwitchHeadAttention", "SwitchHeadCore", "SwitchHeadXLAttention"]


class SwitchHeadCore(RoutedLayer):
    """What both SwitchHead variants share: the projections, the σ-gated value and output experts, the
    init and the recorded losses. Positions and the attention itself are the variants' (RoPE:
    :class:`SwitchHeadAttention`; Transformer-XL with memory: :class:`SwitchHeadXLAttention`).

    Per head h, the query and key projections are dense; the value and output projections are E
    experts each, chosen per head by non-competitive σ-gating
    (:class:`~moezoo.routers.switchhead.SwitchHeadSelector`): the value experts from the **source**
    (key/value-side) token, the output experts from the **destination** (query-side) token::

        V^h(s) = sum_{e in topk(s_V)} s_V[e] * x_s W_V^{h,e}
        A^h    = softmax(Q^h K^h^T / sqrt(d) + positions + mask)
        y(t)   = sum_h sum_{e in topk(s_O)} s_O[e] * (A^h V^h)(t) W_O^{h,e}

    with top-k scores used as weights without renormalisation and the heads summed (no
    concatenation). Q and K are each scaled by ``d^-1/4``. With ``num_experts=1`` the value
    projection is dense and each head's output is gated by ``sigmoid(x W_sel_O^h)``, as the
    reference's one-expert case.

    Regularisation: none in the paper (``perplexity_reg 0``, expert dropout 0 in every SwitchHead
    sweep). Available as in the reference code: ``expert_dropout`` and the selection-entropy loss
    ``entropy_reg`` (σ-MoE's marginal entropy of the V and O selection logits, per sequence over its
    positions and heads; weight it with ``aux_loss_weights={"entropy_reg": ...}``).

    Parameters: ``q.weight``, ``k_proj.weight`` (H*d, dim); ``v`` = ``v_experts.weight`` (H*E, dim, d);
    ``o`` = ``o_experts.weight`` (H*E, d, dim); ``sel_v.gate.weight`` (H*E, dim, absent for E=1);
    ``sel_o.gate.weight`` (H*E, dim). Expert h*E+e is expert e of head h.

    Init (both references): N(0, s/sqrt(dim)) for q, k, v and the selectors (rows renormalised),
    N(0, s/sqrt(H*d)) for o, with ``s = init_scale`` (the authors' pre-LN LMs: sqrt(2 / layers)).

    Args:
        dim: model width.
        num_heads: H.
        num_experts: E per head (paper: 4-8).
        head_dim: d (default dim // num_heads).
        k: experts per head and token (paper: 2-4).
        dropout: the variant's attention dropout (see each).
        expert_dropout: selection dropout (reference; paper 0).
        init_scale: std multiplier of the init.
        backend: backend of the expert projections.
        aux_loss_weights: coefficient per loss name (default none: the paper uses no regulariser).
    """

    def __init__(self, dim: int, num_heads: int = 2, num_experts: int = 4, head_dim: int | None = None, k: int = 2, *,
                 dropout: float = 0.0, expert_dropout: float = 0.0, init_scale: float = 1.0, backend: str = "auto",
                 aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(aux_loss_weights)
        name = type(self).__name__
        for field, value in (("dim", dim), ("num_heads", num_heads), ("num_experts", num_experts), ("k", k)):
            require_int(name, field, value)
        if k > num_experts:
            raise ValueError(f"{name}: k must be <= num_experts={num_experts}, got k={k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.num_experts, self.k = dim, num_heads, num_experts, k
        self.head_dim = head_dim or dim // num_heads
        if self.head_dim < 1:
            raise ValueError(f"{name}: head_dim must be >= 1, got {head_dim} (dim={dim}, heads={num_heads})")
        self.dropout = dropout
        self.init_scale = init_scale
        inner = num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_experts = LinearExperts(dim, self.head_dim, num_heads * num_experts, backend=backend)
        self.o_experts = LinearExperts(self.head_dim, dim, num_heads * num_experts, backend=backend)
        selector = dict(k=k, expert_dropout=expert_dropout, init_scale=init_scale)
        self.sel_v = SwitchHeadSelector(dim, num_heads, num_experts, **selector) if num_experts > 1 else None
        self.sel_o = SwitchHeadSelector(dim, num_heads, num_experts, **selector)

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
        """The references' init: N(0, s/sqrt(dim)) for q, k, v; N(0, s/sqrt(H*d)) for o."""
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

    def queries_and_keys(self, x: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, dim), src: (B, S, dim) -> q (B, H, T, d), k (B, H, S, d), each scaled by
        ``d^-1/4`` (the product carries 1/sqrt(d))."""
        scale = self.head_dim ** -0.25
        q = (self.q(x) * scale).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        k = (self.k_proj(src) * scale).view(src.shape[0], src.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        return q, k

    def values(self, src: Tensor) -> tuple[Tensor, Routing]:
        """src: (B, S, dim) -> values (B, H, S, d) from each source token's own experts, and their routing."""
        (batch, keys, _), heads = src.shape, self.num_heads
        src_flat = src.reshape(-1, self.dim)
        # Rows s*H + h of the source repeated per head, one expert bank for all heads.
        per_head_src = src_flat.repeat_interleave(heads, dim=0)
        if self.sel_v is None:
            rows = torch.arange(per_head_src.shape[0], device=src.device)
            routing = Routing(rows, rows % heads, src.new_ones(rows.shape), rows.numel(), heads)
        else:
            routing = self.sel_v(src_flat)
        v = self.v_experts(per_head_src, routing).view(batch, keys, heads, self.head_dim).transpose(1, 2)
        return v, routing

    def outputs(self, res: Tensor, x: Tensor, v_routing: Routing) -> Tensor:
        """res: (B, H, T, d) attention results, x: (B, T, dim) their queries -> (B, T, dim), every head
        through the output experts of its query token, summed; records the losses and statistics."""
        batch, queries = x.shape[0], x.shape[1]
        o_routing = self.sel_o(x.reshape(-1, self.dim))
        rows = res.transpose(1, 2).reshape(-1, self.head_dim)  # row t*H + h
        out = self.o_experts(rows, o_routing).view(batch * queries, self.num_heads, self.dim).sum(1)

        # Reference regulariser: per sequence, one marginal over its positions and heads, V and O.
        e = self.num_experts
        losses = {"entropy_reg": sum(marginal_entropy_loss(r.logits.view(batch, -1, e))
                                     for r in (v_routing, o_routing) if r.logits is not None)}
        stats = dict(o_routing.stats)
        if self.sel_v is not None:
            stats["tokens_per_expert_v"] = v_routing.stats["tokens_per_expert"]
        self.record(losses, stats)
        return out.view(batch, queries, self.dim)


class SwitchHeadAttention(SwitchHeadCore):
    """SwitchHead with rotary positions: ``forward(x: (B, T, dim), memory=None) -> (B, T, dim)``.

    :class:`SwitchHeadCore` with RoPE on the first ``rotate_fraction`` of the head channels (the
    reference's ``SwitchHeadRope``); ``memory`` is the key/value source of cross-attention.

    Args:
        dim, num_heads, num_experts, head_dim, k, expert_dropout, init_scale, backend,
            aux_loss_weights: see :class:`SwitchHeadCore`.
        dropout: dropout on the queries (reference).
        rotate_fraction: share of head channels with RoPE (reference 0.5); 0 = no positions here.
        rope_base: RoPE base.
    """

    def __init__(self, dim: int, num_heads: int = 2, num_experts: int = 4, head_dim: int | None = None, k: int = 2, *,
                 rotate_fraction: float = 0.5, rope_base: float = 10000.0, dropout: float = 0.0,
                 expert_dropout: float = 0.0, init_scale: float = 1.0, backend: str = "auto",
                 aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(dim, num_heads, num_experts, head_dim, k, dropout=dropout, expert_dropout=expert_dropout,
                         init_scale=init_scale, backend=backend, aux_loss_weights=aux_loss_weights)
        self.rope = RotaryEmbedding(self.head_dim, rotate_fraction, rope_base)
        self.reset_parameters(init_scale)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal: bool = False,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim) queries; memory: (B, S, dim) keys/values (default x, self-attention).

        ``causal`` and ``key_padding_mask`` (B, S) as :func:`~moezoo.layers.attention.attention_mask`.
        """
        src = attention_source(type(self).__name__, x, memory, self.dim, self.dim)
        q, k = self.queries_and_keys(x, src)
        v, v_routing = self.values(src)
        q = F.dropout(q, self.dropout, self.training)
        q, k = self.rope(q, k)
        mask = attention_mask(x.shape[0], x.shape[1], src.shape[1], causal, key_padding_mask, x.device)
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, T, d)
        return self.outputs(res, x, v_routing)


class SwitchHeadXLAttention(SwitchHeadCore):
    """SwitchHead with Transformer-XL relative positions and the previous segment as memory:
    ``forward(x: (B, T, dim), memory: (B, M, dim) | None) -> (B, T, dim)``.

    The attention of the SwitchHead paper's main results, as the authors' training code has it
    (``FullMoeRelativeAttention`` with ``q_expert=k_expert=False``, ``selection_mode="sigmoid"``).
    Keys and values come from ``cat([memory, x])`` (S = M + T); the value experts are selected from
    those source tokens, the output experts from x; query i sits at position M + i::

        score(i, j) = q_i . k_j + q_i . r_{j - (M + i)},   r_p = W_pk (sinusoid(p) * d^-1/4)

    with q and k each scaled by ``d^-1/4`` and the sinusoid of width ``dim``
    (:func:`~moezoo.layers.relative_attention.sinusoidal_embedding`). No content/position biases
    and a fixed scale (unlike :class:`~moezoo.layers.relative_attention.RelativeMultiHeadAttention`).
    The causal mask hides keys j > M + i: the memory stays visible. ``dropout`` acts on k and on
    the position keys, as in the reference. Memory is the caller's to keep (the reference LM feeds
    the previous segment's detached layer input).

    Extra parameter: ``pos_to_pk`` (H*d, dim), init N(0, s/sqrt(dim)) (the reference's name).
    tests/layers/test_switchhead.py checks outputs and gradients against the reference
    (tests/data/xl_references.md).

    Args: see :class:`SwitchHeadCore` (``dropout``: on keys and position keys).
    """

    def __init__(self, dim: int, num_heads: int = 2, num_experts: int = 4, head_dim: int | None = None, k: int = 2, *,
                 dropout: float = 0.0, expert_dropout: float = 0.0, init_scale: float = 1.0, backend: str = "auto",
                 aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(dim, num_heads, num_experts, head_dim, k, dropout=dropout, expert_dropout=expert_dropout,
                         init_scale=init_scale, backend=backend, aux_loss_weights=aux_loss_weights)
        if dim % 2:
            raise ValueError(f"SwitchHeadXLAttention: dim must be even (sin/cos channel pairs), got {dim}")
        self.pos_to_pk = nn.Parameter(torch.empty(num_heads * self.head_dim, dim))
        self.reset_parameters(init_scale)

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        """:meth:`SwitchHeadCore.reset_parameters`, and ``pos_to_pk`` N(0, s/sqrt(dim))."""
        super().reset_parameters(init_scale)
        self.pos_to_pk.normal_(0.0, init_scale / math.sqrt(self.dim))

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal: bool = True) -> Tensor:
        """x: (B, T, dim) current segment; memory: (B, M, dim) earlier positions -> (B, T, dim)."""
        if memory is not None and (memory.dim() != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != self.dim):
            raise ValueError(f"SwitchHeadXLAttention: memory must be (B={x.shape[0]}, M, {self.dim}), "
                             f"got {tuple(memory.shape)}")
        src = attention_source(type(self).__name__, x, None if memory is None else torch.cat([memory, x], 1),
                               self.dim, self.dim)
        (batch, tokens, _), keys = x.shape, src.shape[1]
        mem_len = keys - tokens
        q, k = self.queries_and_keys(x, src)
        v, v_routing = self.values(src)
        k = F.dropout(k, self.dropout, self.training)
        positions = sinusoidal_embedding(relative_offsets(mem_len, tokens, x.device), self.dim).to(x.dtype)
        r = F.linear(positions * self.head_dim ** -0.25, self.pos_to_pk)
        r = F.dropout(r, self.dropout, self.training).view(-1, self.num_heads, self.head_dim).transpose(0, 1)
        scores = q @ k.transpose(-1, -2) + relative_position_logits(q, r, mem_len)  # (B, H, T, S)
        if causal:  # query i sits at M + i: the whole memory stays visible
            scores = scores.masked_fill(~attention_mask(batch, tokens, keys, True, None, x.device), float("-inf"))
        return self.outputs(F.softmax(scores, dim=-1) @ v, x, v_routing)
