"""The Mixture of Attention Heads paper's translation model (Zhang, Shen et al., EMNLP 2022, arXiv
2210.05144): a fairseq-style encoder-decoder transformer whose encoder self-attention, decoder
self-attention and encoder-decoder attention are all MoA layers.

Reference: yikangshen/MoA ``moa_transformer.py`` (``moa_transformer_base``), ``moa_layer/transformer_layer.py``
(the layers; fairseq's ``TransformerEncoderLayerBase`` / ``TransformerDecoderLayerBase`` with MoA attention),
``run.sh`` (the recipe). The MoA layer itself is :class:`~moezoo.layers.MixtureOfAttentionHeads`,
checked against the official layer in tests/layers/test_moa.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_float, require_int
from moezoo.layers.mlp import MLP
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.routers.moa import MOA_LOSS_WEIGHTS

__all__ = ["MoATransformer", "fairseq_sinusoidal_positions"]


def fairseq_sinusoidal_positions(tokens: Tensor, dim: int, padding_idx: int) -> Tensor:
    """fairseq's ``SinusoidalPositionalEmbedding`` of (B, T) token ids -> (B, T, dim).

    Positions count the non-padding tokens from ``padding_idx + 1``; padding gets zeros. Channels are
    ``[sin | cos]`` halves (not interleaved, unlike the Transformer-XL sinusoid of
    :func:`~moezoo.layers.relative_attention.sinusoidal_embedding`) with frequencies
    ``10000^(-i / (dim/2 - 1))``; an odd ``dim`` gets a zero last channel.
    """
    keep = tokens.ne(padding_idx)
    positions = torch.cumsum(keep, dim=1) * keep + padding_idx
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float, device=tokens.device) * -(math.log(10000.0) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb * keep.unsqueeze(-1)


class _Sublayer(nn.Module):
    """fairseq's residual wrapper: ``LN(x + drop(f(x)))`` (post-LN) or ``x + drop(f(LN(x)))`` (pre-LN)."""

    def __init__(self, dim: int, fn: nn.Module, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.fn, self.norm = fn, nn.LayerNorm(dim)
        self.dropout, self.normalize_before = dropout, normalize_before

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        h = self.fn(self.norm(x) if self.normalize_before else x, *args, **kwargs)
        x = x + F.dropout(h, self.dropout, self.training)
        return x if self.normalize_before else self.norm(x)


class EncoderLayer(nn.Module):
    """MoA self-attention (padded queries skipped, padded keys masked), then the ReLU FFN."""

    def __init__(self, attention: nn.Module, ffn: nn.Module, dim: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = _Sublayer(dim, attention, dropout, normalize_before)
        self.ffn = _Sublayer(dim, ffn, dropout, normalize_before)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        x = self.self_attn(x, key_padding_mask=pad, query_padding_mask=pad)
        return self.ffn(x)


class DecoderLayer(nn.Module):
    """Causal MoA self-attention, MoA attention over the encoder output, then the ReLU FFN; padded
    target queries are skipped in both attentions, as the reference's ``self_attn_padding_mask``."""

    def __init__(self, self_attention: nn.Module, cross_attention: nn.Module, ffn: nn.Module, dim: int,
                 dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = _Sublayer(dim, self_attention, dropout, normalize_before)
        self.cross_attn = _Sublayer(dim, cross_attention, dropout, normalize_before)
        self.ffn = _Sublayer(dim, ffn, dropout, normalize_before)

    def forward(self, x: Tensor, pad: Tensor | None, memory: Tensor, memory_pad: Tensor) -> Tensor:
        x = self.self_attn(x, causal=True, key_padding_mask=pad, query_padding_mask=pad)
        x = self.cross_attn(x, memory, key_padding_mask=memory_pad, query_padding_mask=pad)
        return self.ffn(x)


class MoATransformer(nn.Module):
    """Encoder-decoder translation model with MoA in every attention:
    ``forward(source: (B, S), target_in: (B, T)) -> logits (B, T, vocab_size)``.

    As the reference's ``moa_transformer`` with ``--share-all-embeddings``: one token embedding
    (N(0, 1/dim), padding row zero) for source, target and the output projection, scaled by
    sqrt(dim), plus fairseq's sinusoidal positions (:func:`fairseq_sinusoidal_positions`), then
    dropout; post-LN layers (``normalize_before=False``, fairseq's default; True adds a final
    LayerNorm to each stack); each attention a :class:`~moezoo.layers.MixtureOfAttentionHeads` of
    ``num_experts`` experts of ``head_dim``, ``k`` per token (the reference's attention heads), its
    losses recorded per layer; the FFN ``fc2(drop_act(relu(fc1(x))))`` with biases (PyTorch's
    default init, as the reference's ``nn.Linear``).

    The paper's base model (``run.sh`` + ``moa_transformer_base``, "8K8E128D"): dim 512, 6 + 6
    layers, E=8, k=8, head_dim 128, FFN 2048, dropout 0.2, attention dropout 0.2, activation dropout
    0.1.

    Args:
        vocab_size: joined source/target vocabulary (with the special tokens).
        dim, encoder_layers, decoder_layers, ffn_hidden: sizes.
        num_experts, k, head_dim: each MoA layer's E, k and d.
        dropout: embedding and residual-branch dropout.
        attention_dropout: MoA attention-probability dropout.
        activation_dropout: dropout on the FFN's hidden units.
        padding_idx: the padding token (masked as keys, skipped as queries, zero positions).
        normalize_before: pre-LN layers.
        noisy_gating, sample_topk: the reference's ``--gating noisy`` and ``--sample-topk``.
        aux_loss_weights: MoA's loss coefficients (default :data:`~moezoo.routers.moa.MOA_LOSS_WEIGHTS`).
        backend: backend of the expert projections.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 512,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        *,
        num_experts: int = 8,
        k: int = 8,
        head_dim: int = 128,
        ffn_hidden: int = 2048,
        dropout: float = 0.2,
        attention_dropout: float = 0.2,
        activation_dropout: float = 0.1,
        padding_idx: int = 1,
        normalize_before: bool = False,
        noisy_gating: bool = False,
        sample_topk: int = 0,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for field, value in (("vocab_size", vocab_size), ("dim", dim), ("encoder_layers", encoder_layers),
                             ("decoder_layers", decoder_layers), ("ffn_hidden", ffn_hidden)):
            require_int(name, field, value)
        self.padding_idx = require_int(name, "padding_idx", padding_idx, low=0)
        if padding_idx >= vocab_size:
            raise ValueError(f"{name}: padding_idx must be < vocab_size={vocab_size}, got {padding_idx}")
        self.dropout = require_float(name, "dropout", dropout, below=1.0)
        require_float(name, "activation_dropout", activation_dropout, below=1.0)
        self.vocab_size, self.dim = vocab_size, dim
        weights = MOA_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights

        def moa() -> MixtureOfAttentionHeads:
            return MixtureOfAttentionHeads(dim, num_experts, k, head_dim, dropout=attention_dropout,
                                           noisy_gating=noisy_gating, sample_topk=sample_topk, backend=backend,
                                           aux_loss_weights=weights)

        def ffn() -> MLP:
            return MLP(dim, ffn_hidden, "relu", dropout=activation_dropout, drop_output=False)

        self.embed = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, dim ** -0.5)
            self.embed.weight[padding_idx].zero_()
        self.encoder = nn.ModuleList(EncoderLayer(moa(), ffn(), dim, dropout, normalize_before)
                                     for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(moa(), moa(), ffn(), dim, dropout, normalize_before)
                                     for _ in range(decoder_layers))
        self.encoder_norm = nn.LayerNorm(dim) if normalize_before else nn.Identity()
        self.decoder_norm = nn.LayerNorm(dim) if normalize_before else nn.Identity()

    def _embed(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.dim) + fairseq_sinusoidal_positions(tokens, self.dim, self.padding_idx)
        return F.dropout(x, self.dropout, self.training)

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """source: (B, S) ids -> (encoder output (B, S, dim), source padding mask (B, S))."""
        if source.dim() != 2:
            raise ValueError(f"source must have shape (batch, length), got shape {tuple(source.shape)}")
        pad = source.eq(self.padding_idx)
        x = self._embed(source)
        for layer in self.encoder:
            x = layer(x, pad)
        return self.encoder_norm(x), pad

    def decode(self, target_in: Tensor, memory: Tensor, memory_pad: Tensor) -> Tensor:
        """target_in: (B, T) ids (beginning-of-sentence first) -> next-token logits (B, T, vocab_size)."""
        if target_in.dim() != 2:
            raise ValueError(f"target_in must have shape (batch, length), got shape {tuple(target_in.shape)}")
        pad = target_in.eq(self.padding_idx)
        x = self._embed(target_in)
        for layer in self.decoder:
            x = layer(x, pad if bool(pad.any()) else None, memory, memory_pad)
        return self.decoder_norm(x) @ self.embed.weight.t()

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """source: (B, S), target_in: (B, T) ids -> logits (B, T, vocab_size)."""
        return self.decode(target_in, *self.encode(source))

    @torch.no_grad()
    def generate(self, source: Tensor, bos: int, eos: int, max_length: int) -> Tensor:
        """Greedy decoding: (B, S) ids -> (B, L <= max_length) ids after ``bos``, up to and with each
        sentence's ``eos`` (padding after it). The reference decodes with beam 4 and length penalty
        0.6 (``test.sh``); beam search is not implemented."""
        memory, memory_pad = self.encode(source)
        out = torch.full((source.shape[0], 1), bos, dtype=torch.long, device=source.device)
        done = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        for _ in range(max_length):
            step = self.decode(out, memory, memory_pad)[:, -1].argmax(-1)
            step = step.masked_fill(done, self.padding_idx)
            out = torch.cat([out, step[:, None]], dim=1)
            done |= step.eq(eos)
            if bool(done.all()):
                break
        return out[:, 1:]
