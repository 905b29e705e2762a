"""SparseMixer top-2 routing (GRIN / PhiMoE)."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_float
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["SparseMixerRouter"]


class SparseMixerRouter(Router):
    """SparseMixer-v2 top-2 routing (GRIN, Liu et al. 2024, arXiv 2409.12136), as Phi-3.5-MoE.

    :func:`~moezoo.routers.functional.sparse_mixer` on the gate's logits: at evaluation the two best
    experts, each weighted by its softmax over the logits within a relative ``2 * jitter_eps`` of
    it (so mostly 1.0 for a small ε); in training both are sampled (Gumbel-max) among those logits,
    with Heun's third-order midpoint in the forward and the softmax gradient in the backward.
    Always two experts per token, no capacity.

    Args:
        dim: input feature size.
        num_experts: E (>= 2).
        jitter_eps: the threshold ε (PhiMoE's ``router_jitter_noise``, default 0.01), used at
            evaluation too.
        check_finite: see :class:`~moezoo.routers.base.Router`.

    Losses (unweighted): ``load_balancing`` and ``z_loss`` of the plain softmax of the logits and
    its top-2 (as PhiMoE's auxiliary loss, which ignores the sampled choices).
    """

    def __init__(self, dim: int, num_experts: int, *, jitter_eps: float = 0.01, check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, 2, check_finite=check_finite)
        self.jitter_eps = require_float(type(self).__name__, "jitter_eps", jitter_eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, jitter_eps={self.jitter_eps}"

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        weight, index = RF.sparse_mixer(logits, self.jitter_eps, self.training)
        token = torch.arange(num_tokens, device=x.device).repeat(2)  # choice-major, as top_k_assign
        probs = torch.softmax(logits, dim=-1)
        losses = {"load_balancing": L.load_balancing_loss(probs, RF.top_k(probs, 2)[1]), "z_loss": L.z_loss(logits)}
        return self.finish(token, index.t().reshape(-1), weight.t().reshape(-1), num_tokens, logits=logits,
                           probs=probs, losses=losses)
