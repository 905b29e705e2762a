"""Forced-balance routing: a fixed, uniform assignment that ignores the input (debugging, benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["ForcedBalanceRouter"]


class ForcedBalanceRouter(Router):
    """Token ``t`` goes to experts ``(t * k + j) mod E`` for ``j = 0 .. k-1``, each with weight ``1/k``.

    Consecutive tokens walk the experts round-robin, so every expert gets ``tokens * k / E``
    assignments (exactly, when E divides ``tokens * k``; otherwise loads differ by at most one).
    The router has no parameters and no losses; it isolates the expert computation from routing
    (a perfectly balanced load for kernel and dispatcher benchmarks, a deterministic layer for
    debugging). ``k <= E`` keeps a token's k experts distinct.

    Args:
        dim: input feature size (checked, not used).
        num_experts: E.
        k: experts per token.
        check_finite: refuse NaN/inf inputs (they would poison the experts).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, gate=False, check_finite=check_finite)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        num_tokens = x.shape[0]
        # Choice-major, as every token-choice router: all first choices, then all second choices.
        token = torch.arange(num_tokens, device=x.device).repeat(self.k)
        choice = torch.arange(self.k, device=x.device).repeat_interleave(num_tokens)
        expert = (token * self.k + choice) % self.num_experts
        weight = torch.full((token.numel(),), 1.0 / self.k, device=x.device)
        return self.finish(token, expert, weight, num_tokens, logits=None, probs=None, losses={})
