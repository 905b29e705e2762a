"""PEER, Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", arXiv 2407.04153).

N = n^2 single-neuron experts ``e_i(x) = act(u_i . x) v_i`` are retrieved per token by product keys:
each of ``heads`` query networks scores the two halves of its query against two sets of n sub-keys,
keeps the top k of each half, and takes the top k of the k^2 candidate sums, which is exactly the top
k of the N full keys ``concat(K1[a], K2[b])`` (expert ``a * n + b``) at a cost of O(n) not O(N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.routed import RoutedLayer

__all__ = ["PEER", "product_key_top_k"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def product_key_top_k(query: Tensor, sub_keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of ``query . concat(K1[a], K2[b])`` over all n^2 pairs, by product keys.

    Args:
        query: (..., d) with d even; its first half meets K1, its second half K2.
        sub_keys: (2, n, d / 2), K1 and K2.
        k: experts kept, <= n.

    Returns:
        scores (..., k) in descending order and expert indices (..., k) int64, ``a * n + b``.
    """
    n = sub_keys.shape[1]
    q1, q2 = query.chunk(2, dim=-1)
    s1, i1 = (q1 @ sub_keys[0].t()).topk(k, dim=-1)  # (..., k) each
    s2, i2 = (q2 @ sub_keys[1].t()).topk(k, dim=-1)
    # Every pair in the overall top k has both halves in their half's top k, so the k^2 sums hold it.
    sums = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., k*k), candidate (p, q) at p*k + q
    scores, flat = sums.topk(k, dim=-1)
    index = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)
    return scores, index


class PEER(RoutedLayer):
    """PEER layer, a drop-in for a transformer MLP; ``forward(x: (..., dim)) -> (..., dim)``.

    Per token and head h: ``q = BN(W_h x)`` (d_key), the top-k experts by product keys, gates
    ``softmax`` of their k scores, and ``sum_j g_j act(u_{i_j} . x) v_{i_j}``; the heads' outputs are
    summed. Heads share the expert pool and the product keys (the paper's multi-head retrieval).

    Stats: ``experts_used_fraction`` (share of the N experts retrieved at least once in the forward)
    and ``entropy`` (mean gate entropy, nats). There is no ``tokens_per_expert``: at N ~ 10^6 the
    per-expert heatmap the task logs for MoE layers would be a million columns.

    Args:
        dim: model width.
        num_experts: N, a perfect square n^2.
        heads: retrieval heads h, each with its own query network.
        k: experts retrieved per head, <= n.
        key_dim: query / key width d_key (even; each sub-key has d_key / 2).
        batch_norm: batch-normalise the query (the paper's option, as in product-key memories).
        activation: the experts' sigma ("gelu", "relu", "silu").
    """

    def __init__(self, dim: int, num_experts: int, *, heads: int = 8, k: int = 16, key_dim: int = 128,
                 batch_norm: bool = True, activation: str = "gelu") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("heads", heads), ("k", k),
                            ("key_dim", key_dim)):
            require_int("PEER", name, value)
        n = math.isqrt(num_experts)
        if n * n != num_experts:
            raise ValueError(f"PEER: num_experts must be a perfect square n^2 (product keys), got {num_experts}")
        if k > n:
            raise ValueError(f"PEER: k must be <= sqrt(num_experts) = {n} (top-k per sub-key half), got {k}")
        if key_dim % 2:
            raise ValueError(f"PEER: key_dim must be even (two sub-key halves), got {key_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"PEER: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.dim, self.num_experts, self.n, self.heads, self.k, self.key_dim = dim, num_experts, n, heads, k, key_dim
        self.activation = activation
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(heads * key_dim) if batch_norm else None
        self.sub_keys = nn.Parameter(torch.randn(2, n, key_dim // 2) / math.sqrt(key_dim // 2))
        self.down = nn.Embedding(num_experts, dim)  # u_i
        self.up = nn.Embedding(num_experts, dim)  # v_i
        nn.init.normal_(self.down.weight, std=dim**-0.5)
        nn.init.normal_(self.up.weight, std=(heads * k) ** -0.5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, k={self.k}, key_dim={self.key_dim}"

    def retrieve(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat: (tokens, dim) -> scores (tokens, heads, k) descending, experts (tokens, heads, k)."""
        q = self.query(flat)
        if self.query_norm is not None:
            q = self.query_norm(q)
        return product_key_top_k(q.view(-1, self.heads, self.key_dim), self.sub_keys, self.k)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"PEER: x must have shape (..., dim={self.dim}), got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim)
        scores, index = self.retrieve(flat)
        gates = scores.float().softmax(-1).to(flat.dtype)  # (T, h, k)
        hidden = torch.einsum("td,thkd->thk", flat, self.down(index))
        hidden = _ACTIVATIONS[self.activation](hidden) * gates
        out = torch.einsum("thk,thkd->td", hidden, self.up(index))
        with torch.no_grad():
            used = torch.zeros(self.num_experts, dtype=torch.bool, device=x.device)
            used[index.reshape(-1)] = True
            p = gates.float()
            stats = {"experts_used_fraction": used.float().mean(),
                     "entropy": -(p * p.clamp_min(1e-20).log()).sum(-1).mean()}
        self.record({}, stats)
        return out.view(x.shape)

    def expert_parameters(self) -> list[tuple[nn.Parameter, float]]:
        """The expert embeddings, each token reading ``heads * k`` of the N rows (at most N)."""
        share = min(self.heads * self.k, self.num_experts) / self.num_experts
        return [(self.down.weight, share), (self.up.weight, share)]
