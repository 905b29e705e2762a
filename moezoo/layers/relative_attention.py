"""Transformer-XL relative multi-head attention with the previous segment as memory.

The attention of the SwitchHead (arXiv 2312.07987) and σ-MoE (arXiv 2310.10837) papers' main
results, as the authors' training code has it: RobertCsordas/moe_attention
``layers/transformer/multi_head_relative_pos_attention.py`` (``FixedRelativeMultiheadAttention``),
called by ``models/transformer_language_model.py`` with the previous segment's layer input as
memory. tests/layers/test_relative_attention.py checks it against that code's outputs and gradients
(tests/data/xl_references.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.attention import attention_mask

__all__ = ["RelativeMultiHeadAttention", "relative_offsets", "relative_position_logits", "sinusoidal_embedding"]


def sinusoidal_embedding(positions: Tensor, dim: int) -> Tensor:
    """positions: (n,) float -> (n, dim): sin on even channels, cos on odd ones, frequencies
    10000^(-2i/dim) (the reference's ``sinusoidal_pos_embedding``, channels interleaved)."""
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float, device=positions.device)
                         * (-math.log(10000.0) / dim))
    angles = positions.unsqueeze(1) * div_term
    pe = torch.zeros(positions.shape[0], dim, device=positions.device)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


def relative_offsets(memory_length: int, tokens: int, device: torch.device | None = None) -> Tensor:
    """The relative positions ``j - (M + i)`` a segment of T queries after M memory positions needs,
    in order: ``-(M + T - 1), ..., T - 1`` ((M + 2T - 1,) float)."""
    return torch.arange(-(memory_length + tokens - 1), tokens, device=device, dtype=torch.float)


def relative_position_logits(q: Tensor, r: Tensor, memory_length: int) -> Tensor:
    """Transformer-XL's position term: ``q_i . r_{j - (M + i)}`` for every query i and key j.

    Args:
        q: (B, H, T, d) queries; query i sits at position M + i.
        r: (H, M + 2T - 1, d) per-head position keys of :func:`relative_offsets` (M, T).
        memory_length: M.

    Returns:
        (B, H, T, M + T) logits; key j is memory position j for j < M, else segment position j - M.
    """
    tokens = q.shape[-2]
    keys = memory_length + tokens
    by_offset = q @ r.transpose(-1, -2)  # (B, H, T, n_offsets)
    i = torch.arange(tokens, device=q.device)[:, None]
    j = torch.arange(keys, device=q.device)[None, :]
    # Offset j - (M + i) is row j - i + T - 1 of the offsets, for every (i, j).
    index = (j - i + tokens - 1).expand(*by_offset.shape[:-2], tokens, keys)
    return by_offset.gather(-1, index)


class RelativeMultiHeadAttention(nn.Module):
    """Transformer-XL attention: ``forward(x: (B, T, dim), memory: (B, M, dim) | None) -> (B, T, dim)``.

    Keys and values come from ``cat([memory, x])`` (S = M + T positions); query i sits at absolute
    position M + i, key j at j. With q, k, v and the relative-position keys ``r`` projected per head::

        score(i, j) = scale * ((q_i + u) . k_j + (q_i + v_bias) . r_{j - (M + i)})
        r_p         = W_pos @ sinusoid(p)          (p <= 0 for every visible key)

    ``u`` (``content_bias``) and ``v_bias`` (``position_bias``) are learned per head; ``scale`` is a
    learned scalar initialised to 1/sqrt(head_dim); the sinusoid has width ``dim``. Causal masking
    hides keys j > M + i: the whole memory stays visible. Memory is the caller's to keep: the
    reference feeds the previous segment's (detached) layer input, so no gradient reaches it from the
    next segment. Dropout (``dropout``) acts on the content and position keys, as in the reference.

    Parameters, and the reference's names: ``q_proj.weight`` (H*d, dim) = ``data_to_q.weight``;
    ``k_proj.weight``, ``v_proj.weight`` (H*d, dim) = ``data_to_kv.weight.view(H, 2, d, dim)[:, 0]``
    and ``[:, 1]``; ``pos_proj.weight`` (H*d, dim) = ``pos_to_pq.weight``; ``out_proj.weight``
    (dim, H*d) = ``multi_head_merge.weight``; ``content_bias`` (H, d) = ``global_content_bias``;
    ``position_bias`` (H, d) = ``global_pos_bias``; ``scale`` (1,) = ``scale``. No biases.

    Init (the reference's ``reset_parameters``): Xavier-uniform q and position projections; k and v
    uniform with the bound of the fused (2*H*d, dim) Xavier matrix; PyTorch's default Linear init for
    the output; zero u/v biases. The authors' pre-LN models then re-initialise every Linear
    (``reset_prenorm_params``: std sqrt(2 / (layers * fan_in))): that is the model's job.

    Args:
        dim: model width.
        num_heads: H.
        head_dim: d (default dim // num_heads).
        dropout: dropout on the keys (content and position), training only.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, *, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            require_int("RelativeMultiHeadAttention", name, value)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"RelativeMultiHeadAttention: dim={dim} must be a multiple of num_heads={num_heads} "
                                 "when head_dim is not given")
            head_dim = dim // num_heads
        require_int("RelativeMultiHeadAttention", "head_dim", head_dim)
        if dim % 2:
            raise ValueError(f"RelativeMultiHeadAttention: dim must be even (sin/cos channel pairs), got {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"RelativeMultiHeadAttention: dropout must be in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.pos_proj = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.position_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.scale = nn.Parameter(torch.tensor([1.0 / math.sqrt(head_dim)]))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    @property
    def attention_matrices(self) -> int:
        """Attention maps computed per sequence: one per head."""
        return self.num_heads

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's init (see the class docstring)."""
        nn.init.xavier_uniform_(self.q_proj.weight)
        nn.init.xavier_uniform_(self.pos_proj.weight)
        # The reference projects k and v with one (2*H*d, dim) matrix: keep that matrix's bound.
        bound = math.sqrt(6.0 / (self.dim + 2 * self.num_heads * self.head_dim))
        nn.init.uniform_(self.k_proj.weight, -bound, bound)
        nn.init.uniform_(self.v_proj.weight, -bound, bound)
        self.out_proj.reset_parameters()
        self.content_bias.zero_()
        self.position_bias.zero_()
        self.scale.fill_(1.0 / math.sqrt(self.head_dim))

    def _heads(self, t: Tensor) -> Tensor:
        """(B, n, H*d) -> (B, H, n, d)."""
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal: bool = True) -> Tensor:
        """x: (B, T, dim) current segment; memory: (B, M, dim) earlier positions -> (B, T, dim)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"RelativeMultiHeadAttention: x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        if memory is not None and (memory.dim() != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != self.dim):
            raise ValueError(f"RelativeMultiHeadAttention: memory must be (B={x.shape[0]}, M, {self.dim}), "
                             f"got {tuple(memory.shape)}")
        source = x if memory is None else torch.cat([memory, x], dim=1)
        mem_len = source.shape[1] - x.shape[1]
        tokens, keys = x.shape[1], source.shape[1]

        q = self._heads(self.q_proj(x))  # (B, H, T, d)
        k = self._heads(self.dropout(self.k_proj(source)))  # (B, H, S, d)
        v = self._heads(self.v_proj(source))
        offsets = relative_offsets(mem_len, tokens, x.device)
        r = self.dropout(self.pos_proj(sinusoidal_embedding(offsets, self.dim).to(x.dtype)))
        r = r.view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, n_offsets, d)

        content = (q + self.content_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, T, S)
        position = relative_position_logits(q + self.position_bias[:, None], r, mem_len)
        scores = (content + position) * self.scale
        if causal:  # query i sits at M + i: the whole memory stays visible
            scores = scores.masked_fill(~attention_mask(x.shape[0], tokens, keys, True, None, x.device), float("-inf"))
        out = F.softmax(scores, dim=-1) @ v  # (B, H, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], tokens, -1))
