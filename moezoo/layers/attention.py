"""Pieces the attention layers share: rotary position embeddings and the boolean attention mask."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "attention_mask"]


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
