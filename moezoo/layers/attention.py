"""Attention: the dense multi-head attention of the in-house models (with grouped KV heads and a KV
cache), and the pieces every attention layer shares: rotary position embeddings and the mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_float, require_int

__all__ = ["KVCache", "MultiHeadAttention", "RotaryEmbedding", "attention_mask", "attention_source"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``fraction`` of each head's channels (the
    reference's ``RotaryPosEncoding`` with ``rotate_fraction``: "rotate half" convention over the
    rotated channels, frequencies ``base^(-2i/n_rotate)``).

    Args:
        head_dim: channels per head.
        fraction: share of the channels that are rotated (SwitchHead: 0.5); 0 disables RoPE.
        base: frequency base.
    """

    def __init__(self, head_dim: int, fraction: float = 0.5, base: float = 10000.0) -> None:
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"rotate_fraction must be in [0, 1], got {fraction}")
        self.n_rotate = int(fraction * head_dim)
        if self.n_rotate % 2:
            raise ValueError(f"rotate_fraction * head_dim must be even, got {fraction} * {head_dim}")
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, self.n_rotate, 2).float() / max(self.n_rotate, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def extra_repr(self) -> str:
        return f"n_rotate={self.n_rotate}, base={self.base}"

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions: (n,) absolute positions -> cos, sin: (n, n_rotate) in ``dtype``."""
        freqs = torch.outer(positions.to(self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (..., n, head_dim) at the positions of ``cos``, ``sin`` (n, n_rotate) -> rotated x.

        For callers that cache rotated keys (a KV cache keeps absolute positions)."""
        if self.n_rotate == 0:
            return x
        r, rest = x[..., : self.n_rotate], x[..., self.n_rotate :]
        half = self.n_rotate // 2
        rotated = r * cos + torch.cat((-r[..., half:], r[..., :half]), dim=-1) * sin
        return rotated if rest.shape[-1] == 0 else torch.cat((rotated, rest), dim=-1)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q: (..., T, head_dim), k: (..., S, head_dim) -> rotated; query i sits at position
        ``S - T + i`` (the last T of the S key positions), key j at position j."""
        if self.n_rotate == 0:
            return q, k
        cos, sin = self.cos_sin(torch.arange(k.shape[-2], device=k.device), q.dtype)
        offset = k.shape[-2] - q.shape[-2]
        return self.rotate(q, cos[offset:], sin[offset:]), self.rotate(k, cos, sin)


def attention_source(owner: str, x: Tensor, memory: Tensor | None, dim: int, kdim: int) -> Tensor:
    """What keys and values are computed from: ``memory`` (B, S, kdim) for cross-attention, else x
    (B, T, dim) itself; a ``ValueError`` naming ``owner`` when the shapes do not fit."""
    src = x if memory is None else memory
    if x.dim() != 3 or x.shape[-1] != dim or src.dim() != 3 or src.shape[-1] != kdim or src.shape[0] != x.shape[0]:
        raise ValueError(
            f"{owner}: x must be (B, T, dim={dim}) and memory (B, S, kdim={kdim}), got {tuple(x.shape)} and "
            f"{tuple(src.shape)}"
        )
    return src


def attention_mask(batch: int, queries: int, keys: int, causal: bool, key_padding_mask: Tensor | None,
                    device: torch.device) -> Tensor | None:
    """Boolean (B, 1, T, S) mask, True where attention is allowed, or None when nothing is masked."""
    mask = None
    if causal:
        # Query i is at position S - T + i: it sees keys 0..S-T+i.
        mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
        mask = mask.expand(batch, 1, queries, keys)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, keys):
            raise ValueError(
                f"key_padding_mask must have shape (batch, keys)=({batch}, {keys}), got {tuple(key_padding_mask.shape)}"
            )
        keep = (~key_padding_mask.bool()).view(batch, 1, 1, keys)
        mask = keep.expand(batch, 1, queries, keys) if mask is None else mask & keep
    return mask


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer: (batch, kv_heads, seen, head_dim)."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Number of positions cached (0 when empty)."""
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def seen(self, index: int) -> int:
        """Positions cached for layer ``index``."""
        return 0 if index >= len(self.keys) or self.keys[index] is None else self.keys[index].shape[2]

    def update(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions of layer ``index``; returns the layer's full keys and values."""
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[index] is not None:
            k = torch.cat([self.keys[index], k], dim=2)
            v = torch.cat([self.values[index], v], dim=2)
        self.keys[index], self.values[index] = k, v
        return k, v


class MultiHeadAttention(nn.Module):
    """Dense multi-head attention: ``forward(x: (B, T, dim)) -> (B, T, dim)``.

    ``q_proj`` (H*d, dim), ``k_proj`` and ``v_proj`` (H_kv*d, dim), ``o_proj`` (dim, H*d), with
    optional biases; grouped-query attention when ``num_kv_heads < num_heads`` (each KV head serves
    ``H / H_kv`` query heads); RoPE on the first ``rotate_fraction`` of each head's channels at
    absolute positions, also across the steps of a :class:`KVCache`. The text LMs' dense baseline
    (no biases, RoPE on half the channels) and Time-MoE's attention (q/k/v biases, no o bias, full
    RoPE, grouped KV heads) are both this class. Initialisation is nn.Linear's; models apply their own.

    Args:
        dim: model width.
        num_heads: H.
        head_dim: d (default dim // H).
        num_kv_heads: H_kv (default H); must divide H.
        qkv_bias: biases on q, k and v.
        out_bias: a bias on the output projection.
        dropout: attention-probability dropout in training.
        rotate_fraction, rope_base: see :class:`RotaryEmbedding`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, *, num_kv_heads: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, dropout: float = 0.0, rotate_fraction: float = 0.5,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.dim = require_int(owner, "dim", dim)
        self.num_heads = require_int(owner, "num_heads", num_heads)
        self.num_kv_heads = require_int(owner, "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{owner}: num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = require_int(owner, "head_dim", head_dim or dim // num_heads)
        self.dropout = require_float(owner, "dropout", dropout, below=1.0)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=out_bias)
        self.rope = RotaryEmbedding(self.head_dim, rotate_fraction, rope_base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"

    @property
    def attention_matrices(self) -> int:
        """Attention maps computed per sequence: one per head."""
        return self.num_heads

    def forward(self, x: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
                cache: KVCache | None = None, layer_index: int = 0) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        Args:
            causal: query i attends to key positions <= its own.
            key_padding_mask: (B, S) bool, True at padded keys.
            cache: keys and values of earlier steps; x continues them (its positions start at the
                cache's length) and its own keys and values are appended under ``layer_index``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: x must have shape (B, T, dim={self.dim}), got {tuple(x.shape)}")
        batch, tokens, _ = x.shape
        past = 0 if cache is None else cache.seen(layer_index)
        q = self.q_proj(x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope.n_rotate:
            cos, sin = self.rope.cos_sin(torch.arange(past, past + tokens, device=x.device), q.dtype)
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_index, k, v)
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        keys = k.shape[2]
        # The plain causal case takes SDPA's own causal path (the same values as the explicit mask).
        plain_causal = causal and past == 0 and key_padding_mask is None and tokens > 1
        mask = None if plain_causal else attention_mask(batch, tokens, keys, causal and tokens > 1, key_padding_mask,
                                                        x.device)
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(res.transpose(1, 2).reshape(batch, tokens, -1))
