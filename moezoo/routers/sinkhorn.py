"""Sinkhorn routing (S-BASE, Clark et al. 2022): top-k on a Sinkhorn-balanced routing matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["SinkhornRouter"]


class SinkhornRouter(Router):
    """In training, experts are chosen by top-k of ``sinkhorn(logits)`` (rows and columns balanced),
    which spreads tokens evenly without an auxiliary loss; at evaluation by top-k of the logits. The
    weights are always the plain softmax probabilities of the chosen experts.

    Args:
        dim: input feature size.
        num_experts: E.
        k: experts per token.
        num_iters: maximum Sinkhorn iterations.
        tol: stop when the column scaling changes by less than this.

    Losses: ``z_loss``.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, *, num_iters: int = 100, tol: float = 1e-4,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        self.num_iters = require_int(type(self).__name__, "num_iters", num_iters)
        self.tol = require_float(type(self).__name__, "tol", tol)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        probs = torch.softmax(logits, dim=-1)
        if self.training:
            with torch.no_grad():
                selection = RF.sinkhorn(logits, self.num_iters, self.tol)
        else:
            selection = probs.detach()
        token, expert, _ = RF.top_k_assign(selection, self.k)
        return self.finish(token, expert, probs[token, expert], logits.shape[0], logits=logits, probs=probs,
                           losses={"z_loss": L.z_loss(logits)})
