"""Hash routing (Roller et al. 2021): a fixed hash of the token id or position picks the expert."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_int
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["HashRouter"]

_KEYS = ("token", "position")
_MIX = 0x9E3779B1  # Knuth's multiplicative-hash constant (2^32 / golden ratio)


def hash_to_expert(ids: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """Deterministic, well-mixed map of non-negative int ids (any shape) to ``[0, num_experts)``."""
    h = (ids.long() + seed * 0x632BE5AB) & 0xFFFFFFFF
    h = (h * _MIX) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    return h % num_experts


class HashRouter(Router):
    """Routes each token to one expert by a fixed hash, with weight 1; nothing is learned.

    Args:
        dim: input feature size (checked, otherwise unused).
        num_experts: E.
        key: ``"token"`` hashes the token id (``token_ids`` must be given to forward, e.g. through
            ``MoE(x, token_ids=ids)``), ``"position"`` the position in the sequence.
        seed: changes the hash function.

    Losses: none.
    """

    def __init__(self, dim: int, num_experts: int, *, key: str = "token", seed: int = 0,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, gate=False, check_finite=check_finite)
        if key not in _KEYS:
            raise ValueError(f"HashRouter: key must be one of {_KEYS}, got {key!r}")
        self.key = key
        self.seed = require_int("HashRouter", "seed", seed, low=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, key={self.key}"

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Route by token_ids or positions, each (tokens,) int64."""
        ids = token_ids if self.key == "token" else positions
        if ids is None:
            raise ValueError(
                f"HashRouter(key={self.key!r}) needs {'token_ids' if self.key == 'token' else 'positions'} "
                "of shape (tokens,); pass token_ids to the MoE layer's forward"
            )
        ids = ids.reshape(-1)
        if ids.numel() != x.shape[0] or ids.dtype.is_floating_point:
            raise ValueError(f"HashRouter: ids must be {x.shape[0]} integers, got {ids.numel()} of {ids.dtype}")
        num_tokens = x.shape[0]
        expert = hash_to_expert(ids.to(x.device), self.num_experts, self.seed)
        token = torch.arange(num_tokens, device=x.device)
        weight = x.new_ones(num_tokens, dtype=torch.float32)
        return self.finish(token, expert, weight, num_tokens, logits=None, probs=None, losses={})
