"""Decoder-only transformer language models whose attention is dense, MoA or SwitchHead and whose MLP
is dense, MoE or σ-MoE (SwitchAll = SwitchHead + σ-MoE), with rotary positions or Transformer-XL
relative positions and segment memory.

The model around the layers is the SwitchHead / σ-MoE authors' (RobertCsordas/moe_attention
``models/transformer_language_model.py`` with the pre-LN layers of ``layers/transformer/``): token
embedding N(0, 1/dim) and dropout, pre-LN blocks, final LayerNorm, dropout and a linear head with a
bias, every block's linear layers re-initialised as ``reset_prenorm_params`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_float, require_int
from moezoo.layers.attention import MultiHeadAttention
from moezoo.layers.fine_grained import fine_grained_config
from moezoo.layers.mlp import MLP
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.relative_attention import RelativeMultiHeadAttention
from moezoo.layers.routed import RoutedLayer
from moezoo.layers.switchhead import SwitchHeadAttention, SwitchHeadXLAttention
from moezoo.routers.moa import MOA_LOSS_WEIGHTS
from moezoo.routers.sigma_moe import SigmaMoERouter, renorm_keep_std_
from moezoo.routers.top_k import TopKRouter

__all__ = ["ATTENTIONS", "MLPS", "POSITIONS", "TransformerLM", "prenorm_init_", "sigma_moe"]

ATTENTIONS = ("dense", "moa", "switchhead")
MLPS = ("dense", "moe", "sigma_moe")
POSITIONS = ("rope", "xl")


def sigma_moe(dim: int, expert_size: int, num_experts: int, k: int, *, expert_dropout: float = 0.0,
              entropy_weight: float = 1e-3, weight_scale: float = 1.0, backend: str = "auto",
              aux_loss_weights: Mapping[str, float] | None = None) -> MoE:
    """The σ-MoE MLP (Csordás et al. 2023) as an :class:`~moezoo.layers.MoE` configuration.

    E ReLU experts of width ``expert_size`` without biases, selected by
    :class:`~moezoo.routers.sigma_moe.SigmaMoERouter` (sigmoid scores, top-k, no renormalisation,
    expert dropout), weighted by the scores; the entropy regulariser weighted by ``entropy_weight``
    (paper γ: 1e-3 on WikiText-103), unless ``aux_loss_weights`` replaces the coefficients.

    Initialisation as the reference (RobertCsordas/moe ``layers/moe_layer.py``, ``init_norm_mode="full"``,
    ``norm_expert_sel_init``), with its ``weight_scale`` ws (the authors' pre-LN LMs pass
    ``sqrt(2 / layers)``, ``relative_moe_transformer.py``): ``W_in ~ N(0, ws^2/dim)``,
    ``W_out ~ N(0, ws^2/(E * expert_size))``, selector ``N(0, ws^2/dim)`` with its rows renormalised.
    """
    router = SigmaMoERouter(dim, num_experts, k, expert_dropout=expert_dropout)
    layer = MoE(dim, expert_size, num_experts, router, activation="relu", bias=False, backend=backend,
                aux_loss_weights=aux_loss_weights if aux_loss_weights is not None else {"entropy_reg": entropy_weight})
    with torch.no_grad():
        layer.experts.w_in.normal_(0.0, weight_scale * dim ** -0.5)
        layer.experts.w_out.normal_(0.0, weight_scale * (num_experts * expert_size) ** -0.5)
        router.gate.weight.normal_(0.0, weight_scale * dim ** -0.5)
        renorm_keep_std_(router.gate.weight, dim=1)
    return layer


@torch.no_grad()
def prenorm_init_(module: nn.Module, scale: float) -> nn.Module:
    """The authors' pre-LN re-initialisation (RobertCsordas/moe_attention
    ``layers/transformer/transformer_preln.py``, ``reset_prenorm_params``) with ``scale = sqrt(2 / layers)``:
    every ``nn.Linear`` weight is drawn truncated-normal and rescaled to a standard deviation of
    exactly ``scale / sqrt(fan_in)``, its bias zeroed; LayerNorms reset to (1, 0).

    Routed layers (MoA, SwitchHead, MoE) keep their own references' initialisations and are skipped,
    as in the reference, where their weights are not ``nn.Linear``.
    """
    routed = [m for m in module.modules() if isinstance(m, RoutedLayer)]
    skip = {id(p) for m in routed for p in m.parameters()}
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and id(layer.weight) not in skip:
            nn.init.trunc_normal_(layer.weight)
            layer.weight.mul_(scale / math.sqrt(layer.weight.shape[1]) / layer.weight.std())
            if layer.bias is not None:
                layer.bias.zero_()
        elif isinstance(layer, nn.LayerNorm):
            layer.reset_parameters()
    return module


class Block(nn.Module):
    """Pre-LN decoder block: ``x + drop(attn(LN(x), LN(memory)))``, then ``x + drop(mlp(LN(x)))``."""

    def __init__(self, dim: int, attention: nn.Module, mlp: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp
        self.dropout = dropout

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); memory: (B, M, dim) earlier block inputs (XL attention only) -> (B, T, dim)."""
        h = self.norm1(x)
        if isinstance(self.attn, (RelativeMultiHeadAttention, SwitchHeadXLAttention)):
            # As the reference: the memory is normalised by this block's current norm.
            attended = self.attn(h, None if memory is None else self.norm1(memory), causal=True)
        else:
            attended = self.attn(h, causal=True)
        x = x + F.dropout(attended, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class TransformerLM(nn.Module):
    """Decoder-only causal LM: ``forward(tokens: (B, T) int64) -> logits (B, T, vocab_size)``.

    Token embedding, ``depth`` pre-LN blocks, final LayerNorm and a linear head; ``dropout`` on the
    embeddings, on each block's residual branches, on the dense MLP's hidden units and before the
    head, as the SwitchHead/σ-MoE authors' model. Attention and MLP kinds are chosen per model:

    - ``attention="dense"``: :class:`MultiHeadAttention` (RoPE) or
      :class:`~moezoo.layers.relative_attention.RelativeMultiHeadAttention` (XL), ``num_heads`` heads of ``head_dim``.
    - ``attention="moa"``: :class:`~moezoo.layers.MixtureOfAttentionHeads` with ``attention_experts``
      experts of ``head_dim``, ``attention_k`` per token (MoA's defaults for its losses); RoPE only.
    - ``attention="switchhead"``: :class:`~moezoo.layers.SwitchHeadAttention` (RoPE) or
      :class:`~moezoo.layers.switchhead.SwitchHeadXLAttention` (XL) with ``num_heads`` heads of
      ``head_dim``, ``attention_experts`` V/O experts per head, ``attention_k`` active.
    - ``mlp="dense"``: ``fc2(drop(relu(fc1(x))))`` of ``mlp_hidden``, with biases when ``mlp_bias``
      (the SwitchHead/σ-MoE baselines').
    - ``mlp="moe"``: :class:`~moezoo.layers.MoE` of ``mlp_experts`` experts of ``mlp_hidden``
      (``router``: a factory, default top-``mlp_k`` softmax, Switch/GShard losses 0.01). With
      ``mlp_granularity`` m and ``mlp_shared_experts`` K_s it is DeepSeekMoE's layout of that layer
      (:func:`~moezoo.layers.fine_grained.fine_grained_config`: ``m E - K_s`` routed experts of
      ``mlp_hidden / m``, ``m k - K_s`` active, plus K_s ungated shared ones; same active parameters).
    - ``mlp="sigma_moe"``: :func:`sigma_moe` with ``mlp_experts`` experts of ``mlp_hidden``,
      ``mlp_k`` active, ``mlp_expert_dropout``, entropy weight ``sigma_moe_entropy``.

    Positions (``positions``): ``"rope"``, rotary embeddings on ``rotate_fraction`` of each head's
    channels (the reference's RoPE variants); ``"xl"``, Transformer-XL relative positions (the
    papers' main results), with **segment memory** when ``memory_length > 0``.

    Segment memory, as the reference LM (``n_prev_states``): every block attends to the last
    ``memory_length`` of its own earlier inputs as well as to the current segment. After each
    forward the model keeps, per block, ``cat(memory, block input)[-memory_length:]`` **detached**
    (no gradient crosses segments), separately for training and for evaluation: training memory
    persists across forwards until :meth:`reset_memory`; evaluation memory is emptied whenever the
    model is put in eval mode (each validation starts from none, as the reference's); a batch of
    another size starts new streams (the memory is dropped). Memory only means something when row b
    of every batch continues row b of the previous one:
    :class:`~moezoo.modalities.text.segments.SegmentTextDataModule` feeds such batches and
    :class:`~moezoo.modalities.text.segments.SegmentLanguageModeling` resets the memory at each
    epoch. ``memory_length = context_length`` is the reference's one previous segment.

    Initialisation, the authors' pre-LN recipe with ``s = init_scale`` (default ``sqrt(2 / depth)``):
    :func:`prenorm_init_` on every block (dense attention and MLP: std ``s / sqrt(fan_in)``, zero
    biases), SwitchHead's and σ-MoE's own inits scaled by s, MoA keeps its reference's init; token
    embedding N(0, 1/dim) (the reference's Kaiming-normal), head PyTorch's default.

    Args:
        vocab_size: output classes (256 for raw bytes).
        dim, depth: width and blocks.
        context_length: the training context (informational; neither position scheme has a limit).
        positions: ``"rope"`` or ``"xl"``.
        memory_length: positions of segment memory per block (``"xl"`` only; 0 = none).
        init_scale: s above.
        dropout: embedding, residual-branch, MLP-hidden and pre-head dropout.
        attention_dropout: attention dropout (dense RoPE and MoA: on the probabilities; SwitchHead RoPE:
            on q; XL attention: on the content and position keys, as the reference).
        rotate_fraction, rope_base: RoPE on that share of the head channels (SwitchHead: 0.5).
        mlp_bias: biases in the dense MLP (the papers' baselines have them).
        head_bias: a bias in the output head (the reference's ``nn.Linear`` has one).
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
        positions: str = "rope",
        memory_length: int = 0,
        num_heads: int = 4,
        head_dim: int | None = None,
        attention_experts: int = 4,
        attention_k: int = 2,
        attention_expert_dropout: float = 0.0,
        mlp: str = "dense",
        mlp_hidden: int = 512,
        mlp_bias: bool = True,
        mlp_experts: int = 8,
        mlp_k: int = 2,
        mlp_expert_dropout: float = 0.0,
        mlp_granularity: int = 1,
        mlp_shared_experts: int = 0,
        sigma_moe_entropy: float = 1e-3,
        router: RouterFactory | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000.0,
        init_scale: float | None = None,
        tie_embeddings: bool = False,
        head_bias: bool = True,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if attention not in ATTENTIONS:
            raise ValueError(f"{name}: attention must be one of {ATTENTIONS}, got {attention!r}")
        if mlp not in MLPS:
            raise ValueError(f"{name}: mlp must be one of {MLPS}, got {mlp!r}")
        if positions not in POSITIONS:
            raise ValueError(f"{name}: positions must be one of {POSITIONS}, got {positions!r}")
        if positions == "xl" and attention == "moa":
            raise ValueError(f"{name}: positions='xl' is for attention 'dense' or 'switchhead', got attention='moa' "
                             "(MoA's own model is the encoder-decoder of moezoo.modalities.text.translation)")
        for field, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth),
                             ("context_length", context_length), ("mlp_hidden", mlp_hidden)):
            require_int(name, field, value)
        self.memory_length = require_int(name, "memory_length", memory_length, low=0)
        if self.memory_length and positions != "xl":
            raise ValueError(f"{name}: memory_length={memory_length} needs positions='xl', got positions={positions!r}")
        self.dropout = require_float(name, "dropout", dropout, below=1.0)
        self.vocab_size, self.dim, self.depth, self.context_length = vocab_size, dim, depth, context_length
        self.attention_kind, self.mlp_kind, self.positions = attention, mlp, positions
        scale = math.sqrt(2.0 / depth) if init_scale is None else require_float(name, "init_scale", init_scale,
                                                                                strict=True)
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            attn = self._attention(attention, positions, dim, num_heads, head_dim, attention_experts, attention_k,
                                   attention_expert_dropout, attention_dropout, rotate_fraction, rope_base, scale,
                                   backend, aux_loss_weights)
            if mlp == "dense":
                ffn = MLP(dim, mlp_hidden, "relu", bias=mlp_bias, dropout=dropout, drop_output=False)
            elif mlp == "moe":
                fine = fine_grained_config(mlp_experts, mlp_k, mlp_hidden, mlp_granularity, mlp_shared_experts)
                ffn = MoE(dim, fine.hidden, fine.num_experts,
                          router or (lambda d, e, k=fine.k: TopKRouter(d, e, k=k)),
                          shared_experts=fine.shared_experts, shared_hidden=fine.hidden,
                          activation="relu", bias=False, backend=backend,
                          aux_loss_weights=aux_loss_weights or {"load_balancing": 0.01})
            else:
                ffn = sigma_moe(dim, mlp_hidden, mlp_experts, mlp_k, expert_dropout=mlp_expert_dropout,
                                entropy_weight=sigma_moe_entropy, weight_scale=scale, backend=backend,
                                aux_loss_weights=aux_loss_weights)
            self.blocks.append(prenorm_init_(Block(dim, attn, ffn, dropout), scale))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=head_bias)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, dim ** -0.5)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._memory: dict[bool, list[Tensor] | None] = {True: None, False: None}

    @staticmethod
    def _attention(kind, positions, dim, num_heads, head_dim, experts, k, expert_dropout, dropout, rotate_fraction,
                   rope_base, scale, backend, aux_loss_weights) -> nn.Module:
        if kind == "dense" and positions == "xl":
            return RelativeMultiHeadAttention(dim, num_heads, head_dim, dropout=dropout)
        if kind == "dense":
            return MultiHeadAttention(dim, num_heads, head_dim, dropout=dropout, rotate_fraction=rotate_fraction,
                                      rope_base=rope_base)
        if kind == "moa":
            return MixtureOfAttentionHeads(dim, experts, k, head_dim or dim // k, dropout=dropout,
                                           rotate_fraction=rotate_fraction, rope_base=rope_base, backend=backend,
                                           aux_loss_weights=aux_loss_weights or MOA_LOSS_WEIGHTS)
        common = dict(dropout=dropout, expert_dropout=expert_dropout, init_scale=scale, backend=backend,
                      aux_loss_weights=aux_loss_weights)
        if positions == "xl":
            return SwitchHeadXLAttention(dim, num_heads, experts, head_dim, k, **common)
        return SwitchHeadAttention(dim, num_heads, experts, head_dim, k, rotate_fraction=rotate_fraction,
                                   rope_base=rope_base, **common)

    def attention_matrices(self) -> int:
        """Attention maps (T x T score matrices) computed per sequence over all blocks."""
        return sum(block.attn.attention_matrices for block in self.blocks)

    # -- segment memory --------------------------------------------------------------------------
    def reset_memory(self) -> None:
        """Forget the segment memory of training and of evaluation."""
        self._memory = {True: None, False: None}

    @property
    def memory(self) -> list[Tensor] | None:
        """Per block, the (B, <= memory_length, dim) detached earlier inputs the next forward in the
        current mode attends to; None when empty."""
        return self._memory[self.training]

    def train(self, mode: bool = True) -> TransformerLM:
        if not mode:  # every evaluation starts from an empty memory, the training memory waits
            self._memory[False] = None
        return super().train(mode)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) int64 -> next-token logits (B, T, vocab_size); with ``memory_length`` the
        segment continues the previous forward's (see the class docstring)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, time), got shape {tuple(tokens.shape)}")
        x = F.dropout(self.embed(tokens), self.dropout, self.training)
        memory = self.memory
        if memory is not None and memory[0].shape[0] != tokens.shape[0]:
            memory = None  # another batch size: other streams
        kept = []
        for i, block in enumerate(self.blocks):
            block_memory = None if memory is None else memory[i]
            if self.memory_length:
                seen = x.detach() if block_memory is None else torch.cat([block_memory, x.detach()], 1)
                kept.append(seen[:, -self.memory_length:])
            x = block(x, block_memory)
        if self.memory_length:
            self._memory[self.training] = kept
        return self.head(F.dropout(self.norm(x), self.dropout, self.training))
