"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Every expert picks its ``C = ceil(tokens * capacity_factor / E)`` highest-probability tokens.

    Probabilities are the softmax over experts of each token's logits; the weight of an assignment is
    that probability. Load is perfectly balanced by construction; a token may get any number of
    experts, including none. Expert choice looks at the whole batch, so it is not causal.

    Args:
        dim: input feature size.
        num_experts: E.
        capacity_factor: average experts per token (the paper's c; 2 matches top-2 compute).
        eval_capacity_factor: c at evaluation (None: same).

    Losses: ``z_loss``.
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0, *,
                 eval_capacity_factor: float | None = None, check_finite: bool = True) -> None:
        if capacity_factor is None:
            raise ValueError(f"{type(self).__name__}: capacity_factor must be a number > 0, got None")
        super().__init__(dim, num_experts, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, check_finite=check_finite)

    def check_capacity_groups(self, capacity_groups: list[int], num_tokens: int) -> None:
        raise ValueError(f"{type(self).__name__}: experts choose among all tokens; capacity_groups is not supported")

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        probs = torch.softmax(logits, dim=-1)
        factor = self.current_capacity_factor()
        capacity = min(RF.expert_capacity(num_tokens, num_experts, 1, factor), num_tokens)
        token, expert, weight = RF.expert_choice_assign(probs, capacity)
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=probs,
                           losses={"z_loss": L.z_loss(logits)}, requested=token.numel())
