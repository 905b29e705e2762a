"""BASE layers (Lewis et al. 2021): a balanced linear assignment of tokens to experts."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.routers import functional as RF
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["BalancedAssignmentRouter"]


class BalancedAssignmentRouter(Router):
    """BASE routing: in training, each expert gets an equal share of tokens (``ceil(tokens/E)``
    places) and the assignment maximises the total token-expert affinity (solved exactly as a
    linear assignment, :func:`moezoo.routers.functional.balanced_assignment`); at evaluation each
    token takes its best expert (greedy top-1). The weight is ``sigmoid(affinity)``, as the BASE
    layer's output ``x + sigmoid(x . w_e) * f_e(x)``.

    Losses: none (balance is enforced, not encouraged).
    """

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        if self.training:
            expert = RF.balanced_assignment(logits)
        else:
            expert = RF.top_k(logits, 1)[1].squeeze(1)
        token = torch.arange(num_tokens, device=x.device)
        weight = torch.sigmoid(logits[token, expert])
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=torch.softmax(logits, dim=-1),
                           losses={})
