"""Mixture of Attention Heads (Zhang, Shen et al., EMNLP 2022, arXiv 2210.05144).

Reference: yikangshen/MoA ``moa_layer/moa_attention.py`` and ``moa_layer/parallel_linear/moe.py``
(``MoE.map`` / ``MoE.reduce``); re-implemented for causal LMs in RobertCsordas/moe_attention
``layers/transformer/moa.py``.
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
from moezoo.routers.moa import MOA_LOSS_WEIGHTS, MoARouter
from moezoo.routers.routing import Routing

__all__ = ["MixtureOfAttentionHeads"]


class MixtureOfAttentionHeads(RoutedLayer):
    """MoA: ``forward(x: (B, T, dim), memory=None) -> (B, T, dim)``.

    E attention experts, each with its own query projection ``W_q^i`` (dim -> d) and output
    projection ``W_o^i`` (d -> dim); one key and one value projection (dim -> d) shared by all.
    For each query token t the router (:class:`~moezoo.routers.moa.MoARouter`) picks k experts::

        p_t    = softmax(x_t W_g)                       (zero-initialised W_g)
        a_ti   = softmax((x_t W_q^i) K^T / sqrt(d)) V   for i in topk(p_t)
        y_t    = sum_{i in topk(p_t)} p_t[i] * a_ti W_o^i     (not renormalised)

    so k attention maps are computed per token, each with its own expert query. Auxiliary losses
    (recorded unweighted, default coefficients the reference's: ``load_balancing`` 0.01 (its
    "switchloss"), ``z_loss`` 0.001, ``cv`` 0). The reference adds their sum to the
    *token-summed* cross-entropy (fairseq divides both by the token count afterwards); with a
    token-mean objective, as :class:`~moezoo.task.MoETask`, multiply the coefficients by the
    tokens per batch to reproduce that scale exactly.

    Initialisation as the reference: expert matrices uniform ``±sqrt(3) * sqrt(2 / (fan_in +
    fan_out))``, K and V Xavier-uniform with gain ``1/sqrt(2)`` (gain 1 when ``kdim != dim``), no
    biases. The reference uses no rotary embedding (fairseq adds sinusoidal positions to the
    input); ``rotate_fraction > 0`` adds RoPE to the queries and keys for decoder-only LMs.

    Args:
        dim: model width (query side).
        num_experts: E.
        k: experts (heads) per token.
        head_dim: d (reference default 256; paper base 128).
        kdim: width of ``memory`` (cross-attention; default dim).
        dropout: attention-probability dropout.
        noisy_gating: the reference's ``--gating noisy`` (z-loss on the noisy logits in training).
        sample_topk: the reference's ``--sample-topk``: experts per token sampled in training.
        rotate_fraction, rope_base: optional RoPE (see :class:`~moezoo.layers.attention.RotaryEmbedding`).
        backend: backend of the expert projections.
        aux_loss_weights: coefficient per loss name (default :data:`~moezoo.routers.moa.MOA_LOSS_WEIGHTS`).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 8,
        k: int = 2,
        head_dim: int = 64,
        *,
        kdim: int | None = None,
        dropout: float = 0.0,
        noisy_gating: bool = False,
        sample_topk: int = 0,
        rotate_fraction: float = 0.0,
        rope_base: float = 10000.0,
        backend: str = "auto",
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(MOA_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights)
        for name, value in (("dim", dim), ("num_experts", num_experts), ("k", k), ("head_dim", head_dim)):
            require_int("MixtureOfAttentionHeads", name, value)
        if k > num_experts:
            raise ValueError(f"MixtureOfAttentionHeads: k must be <= num_experts={num_experts}, got k={k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MixtureOfAttentionHeads: dropout must be in [0, 1), got {dropout}")
        self.dim, self.num_experts, self.k, self.head_dim = dim, num_experts, k, head_dim
        self.kdim = kdim or dim
        self.dropout = dropout
        self.router = MoARouter(dim, num_experts, k, noisy=noisy_gating, sample_topk=sample_topk)
        self.q_experts = LinearExperts(dim, head_dim, num_experts, backend=backend)
        self.o_experts = LinearExperts(head_dim, dim, num_experts, backend=backend)
        self.k_proj = nn.Linear(self.kdim, head_dim, bias=False)
        self.v_proj = nn.Linear(self.kdim, head_dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, rotate_fraction, rope_base)
        self.reset_parameters()

    @property
    def w_q(self) -> nn.Parameter:
        """(E, dim, d) expert query projections (the reference's ``q_proj.experts.w``)."""
        return self.q_experts.weight

    @property
    def w_o(self) -> nn.Parameter:
        """(E, d, dim) expert output projections (the reference's ``q_proj.output_experts.w``)."""
        return self.o_experts.weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, head_dim={self.head_dim}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w_q, self.w_o):
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (w.shape[1] + w.shape[2]))
            w.uniform_(-bound, bound)
        gain = 1.0 / math.sqrt(2.0) if self.kdim == self.dim else 1.0
        nn.init.xavier_uniform_(self.k_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.v_proj.weight, gain=gain)
        nn.init.zeros_(self.router.gate.weight)

    @property
    def attention_matrices(self) -> int:
        """Attention maps computed per sequence: one per selected head (k)."""
        return self.k

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal: bool = False,
                key_padding_mask: Tensor | None = None, query_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim) queries; memory: (B, S, kdim) keys/values (default x, self-attention).

        ``causal`` and ``key_padding_mask`` (B, S) as :func:`~moezoo.layers.attention.attention_mask`;
        ``query_padding_mask`` (B, T) bool, True at padded queries: as the reference's
        ``query_padding_mask`` they are routed nowhere, their output is zero and they are left out of
        the switch and cv losses (:class:`~moezoo.routers.moa.MoARouter`).
        """
        src = attention_source("MixtureOfAttentionHeads", x, memory, self.dim, self.kdim)
        (batch, queries, _), keys = x.shape, src.shape[1]
        k, d = self.k, self.head_dim
        tokens = batch * queries
        if query_padding_mask is not None and query_padding_mask.shape != (batch, queries):
            raise ValueError(f"MixtureOfAttentionHeads: query_padding_mask must have shape (batch, queries)="
                             f"({batch}, {queries}), got {tuple(query_padding_mask.shape)}")
        routing = self.router(x.reshape(tokens, self.dim),
                              padding_mask=None if query_padding_mask is None else query_padding_mask.reshape(-1).bool())
        # MoARouter's assignments are choice-major over its kept tokens: assignment a is choice a // kept.
        kept = max(routing.num_assignments // k, 1)
        slot_row = routing.token * k + torch.arange(routing.num_assignments, device=x.device) // kept
        ones = torch.ones_like(routing.weight)
        q_routing = Routing(slot_row, routing.expert, ones, tokens * k, self.num_experts)
        q = self.q_experts(x.reshape(tokens, self.dim).repeat_interleave(k, dim=0), q_routing)
        q = q.view(batch, queries, k, d).transpose(1, 2)  # (B, k, T, d): slot j of every token (0 if skipped)
        key = self.k_proj(src).unsqueeze(1).expand(batch, k, keys, d)
        value = self.v_proj(src).unsqueeze(1).expand(batch, k, keys, d)
        q, key = self.rope(q, key)
        mask = attention_mask(batch, queries, keys, causal, key_padding_mask, x.device)
        res = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        rows = res.transpose(1, 2).reshape(tokens * k, d)
        o_routing = Routing(slot_row, routing.expert, routing.weight, tokens * k, self.num_experts)
        out = self.o_experts(rows, o_routing).view(tokens, k, self.dim).sum(1)
        self.record(routing.losses, routing.stats)
        return out.view(batch, queries, self.dim)
