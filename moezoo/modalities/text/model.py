"""Decoder-only transformer language models whose attention is dense, MoA or SwitchHead and whose MLP
is dense, MoE or σ-MoE (SwitchAll = SwitchHead + σ-MoE)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.attention import MultiHeadAttention
from moezoo.layers.mlp import MLP
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.switchhead import SwitchHeadAttention
from moezoo.routers.moa import MOA_LOSS_WEIGHTS
from moezoo.routers.sigma_moe import SigmaMoERouter
from moezoo.routers.top_k import TopKRouter

__all__ = ["ATTENTIONS", "MLPS", "TransformerLM", "init_dense_attention", "sigma_moe"]

ATTENTIONS = ("dense", "moa", "switchhead")
MLPS = ("dense", "moe", "sigma_moe")


def sigma_moe(dim: int, expert_size: int, num_experts: int, k: int, *, expert_dropout: float = 0.0,
              entropy_weight: float = 1e-3, backend: str = "auto",
              aux_loss_weights: Mapping[str, float] | None = None) -> MoE:
    """The σ-MoE MLP (Csordás et al. 2023) as an :class:`~moezoo.layers.MoE` configuration.

    E ReLU experts of width ``expert_size`` without biases, selected by
    :class:`~moezoo.routers.sigma_moe.SigmaMoERouter` (sigmoid scores, top-k, no renormalisation,
    expert dropout), weighted by the scores; the entropy regulariser weighted by ``entropy_weight``
    (paper γ: 1e-3 on WikiText-103), unless ``aux_loss_weights`` replaces the coefficients. Initialisation as the reference: ``W_in ~ N(0, 1/dim)``,
    ``W_out ~ N(0, 1/(E * expert_size))`` (``init_norm_mode="full"``), selector rows renormalised.
    """
    router = SigmaMoERouter(dim, num_experts, k, expert_dropout=expert_dropout)
    layer = MoE(dim, expert_size, num_experts, router, activation="relu", bias=False, backend=backend,
                aux_loss_weights=aux_loss_weights if aux_loss_weights is not None else {"entropy_reg": entropy_weight})
    with torch.no_grad():
        layer.experts.w_in.normal_(0.0, dim ** -0.5)
        layer.experts.w_out.normal_(0.0, (num_experts * expert_size) ** -0.5)
    return layer


@torch.no_grad()
def init_dense_attention(attention: MultiHeadAttention, scale: float) -> MultiHeadAttention:
    """The dense baseline's initialisation, SwitchHead's conventions: N(0, s/sqrt(dim)) for q, k, v
    and N(0, s/sqrt(H*d)) for the output projection."""
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        projection.weight.normal_(0.0, scale / math.sqrt(attention.dim))
    attention.o_proj.weight.normal_(0.0, scale / math.sqrt(attention.num_heads * attention.head_dim))
    return attention


class Block(nn.Module):
    """Pre-LN decoder block: ``x + drop(attn(LN(x)))``, then ``x + drop(mlp(LN(x)))``."""

    def __init__(self, dim: int, attention: nn.Module, mlp: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        x = x + F.dropout(self.attn(self.norm1(x), causal=True), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class TransformerLM(nn.Module):
    """Decoder-only causal LM: ``forward(tokens: (B, T) int64) -> logits (B, T, vocab_size)``.

    Token embedding, ``depth`` pre-LN blocks with rotary positions inside attention, final
    LayerNorm and a linear head. Attention and MLP kinds are chosen per model:

    - ``attention="dense"``: :class:`MultiHeadAttention` with ``num_heads`` heads of ``head_dim``.
    - ``attention="moa"``: :class:`~moezoo.layers.MixtureOfAttentionHeads` with ``attention_experts``
      experts of ``head_dim``, ``attention_k`` per token (MoA's defaults for its losses).
    - ``attention="switchhead"``: :class:`~moezoo.layers.SwitchHeadAttention` with ``num_heads``
      heads of ``head_dim``, ``attention_experts`` V/O experts per head, ``attention_k`` active.
    - ``mlp="dense"``: a ReLU MLP of ``mlp_hidden`` (the SwitchHead/σ-MoE baselines').
    - ``mlp="moe"``: :class:`~moezoo.layers.MoE` of ``mlp_experts`` experts of ``mlp_hidden``
      (``router``: a factory, default top-``mlp_k`` softmax, Switch/GShard losses 0.01).
    - ``mlp="sigma_moe"``: :func:`sigma_moe` with ``mlp_experts`` experts of ``mlp_hidden``,
      ``mlp_k`` active, ``mlp_expert_dropout``, entropy weight ``sigma_moe_entropy``.

    Args:
        vocab_size: output classes (256 for raw bytes).
        dim, depth: width and blocks.
        context_length: the training context (informational; RoPE has no length limit).
        init_scale: attention init scale (default ``1/sqrt(depth)``, SwitchHead's recommendation).
        dropout: residual-branch dropout.
        attention_dropout: attention dropout (MoA and dense: on the probabilities; SwitchHead: on q).
        rotate_fraction, rope_base: RoPE on that share of the head channels (SwitchHead: 0.5).
        aux_loss_weights: override every routed layer's coefficients (None: the layers' defaults).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 128,
        depth: int = 4,
        context_length: int = 128,
        *,
        attention: str = "dense",
        num_heads: int = 4,
        head_dim: int | None = None,
        attention_experts: int = 4,
        attention_k: int = 2,
        attention_expert_dropout: float = 0.0,
        mlp: str = "dense",
        mlp_hidden: int = 512,
        mlp_experts: int = 8,
        mlp_k: int = 2,
        mlp_expert_dropout: float = 0.0,
        sigma_moe_entropy: float = 1e-3,
        router: RouterFactory | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000.0,
        init_scale: float | None = None,
        tie_embeddings: bool = False,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth),
                            ("context_length", context_length), ("mlp_hidden", mlp_hidden)):
            require_int("TransformerLM", name, value)
        self.vocab_size, self.dim, self.depth, self.context_length = vocab_size, dim, depth, context_length
        self.attention_kind, self.mlp_kind = attention, mlp
        scale = 1.0 / math.sqrt(depth) if init_scale is None else init_scale
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            if attention == "dense":
                attn = init_dense_attention(MultiHeadAttention(dim, num_heads, head_dim, dropout=attention_dropout,
                                                               rotate_fraction=rotate_fraction, rope_base=rope_base),
                                            scale)
            elif attention == "moa":
                attn = MixtureOfAttentionHeads(dim, attention_experts, attention_k, head_dim or dim // attention_k,
                                               dropout=attention_dropout, rotate_fraction=rotate_fraction,
                                               rope_base=rope_base, backend=backend,
                                               aux_loss_weights=aux_loss_weights or MOA_LOSS_WEIGHTS)
            else:
                attn = SwitchHeadAttention(dim, num_heads, attention_experts, head_dim, attention_k,
                                           dropout=attention_dropout, expert_dropout=attention_expert_dropout,
                                           rotate_fraction=rotate_fraction, rope_base=rope_base, init_scale=scale,
                                           backend=backend, aux_loss_weights=aux_loss_weights)
            if mlp == "dense":
                ffn = MLP(dim, mlp_hidden, "relu", bias=False)
            elif mlp == "moe":
                ffn = MoE(dim, mlp_hidden, mlp_experts, router or (lambda d, e: TopKRouter(d, e, k=mlp_k)),
                          activation="relu", bias=False, backend=backend,
                          aux_loss_weights=aux_loss_weights or {"load_balancing": 0.01})
            else:
                ffn = sigma_moe(dim, mlp_hidden, mlp_experts, mlp_k, expert_dropout=mlp_expert_dropout,
                                entropy_weight=sigma_moe_entropy, backend=backend, aux_loss_weights=aux_loss_weights)
            self.blocks.append(Block(dim, attn, ffn, dropout))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def attention_matrices(self) -> int:
        """Attention maps (T x T score matrices) computed per sequence over all blocks."""
        return sum(block.attn.attention_matrices for block in self.blocks)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) int64 -> next-token logits (B, T, vocab_size)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, time), got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
