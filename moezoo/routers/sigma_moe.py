"""σ-MoE's expert selection (Csordás, Irie, Schmidhuber 2023, arXiv 2310.10837) and its entropy regulariser.

Reference: RobertCsordas/moe (and the copy in RobertCsordas/moe_attention) ``layers/moe_layer.py``
with ``selection_mode="sigmoid"``, ``reg_type="entropy"``, ``perplexity_reg_mode="global"``,
``norm_expert_sel_init=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_float
from moezoo.routers import functional as RF
from moezoo.routers.base import Router
from moezoo.routers.losses import marginal_entropy_loss
from moezoo.routers.routing import Routing

__all__ = ["SigmaMoERouter", "renorm_keep_std_"]


@torch.no_grad()
def renorm_keep_std_(weight: Tensor, dim: int = 1) -> Tensor:
    """The reference's ``renorm_keep_std``: rescale the slices along ``dim`` to equal L2 norm,
    keeping the tensor's overall standard deviation. In place; returns ``weight``."""
    std = weight.std()
    weight.div_(weight.norm(dim=dim, keepdim=True))
    weight.mul_(std / weight.std())
    return weight


class SigmaMoERouter(Router):
    """Non-competitive σ-MoE selection: each token takes the k experts with the highest
    ``sigmoid(x W_s^T)`` and uses those scores as weights, **not renormalised**.

    Expert dropout, as the reference defines it: in training, each (token, expert) score is set to 0
    with probability ``expert_dropout`` *before* the top-k; the weights are taken from the dropped
    scores, so a dropped expert that still ends up among the top k (when fewer than k survive)
    contributes with weight 0.

    Initialisation (``norm_expert_sel_init``): ``W_s ~ N(0, 1/dim)``, then its rows rescaled to
    equal norm keeping the overall std.

    Losses (unweighted): ``entropy_reg`` = :func:`marginal_entropy_loss` of the selection logits of
    this forward (the paper's γ: 1e-3 for WikiText-103, 1e-4 in the SwitchAll configs). In training
    under torch.distributed the marginal is over the tokens of **every process**, as the reference
    (``perplexity_reg_mode="global"``, ``sync_distributed``): every process must route at the same
    point (they do under DDP/FSDP); in evaluation, where the loss is unused, it is per process.

    Args:
        dim: input feature size.
        num_experts: E.
        k: experts per token (the reference's ``pkm.n_heads``).
        expert_dropout: probability of dropping a (token, expert) score in training (paper: 0 small,
            0.1 big).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 4, *, expert_dropout: float = 0.0,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        self.expert_dropout = require_float(type(self).__name__, "expert_dropout", expert_dropout, below=1.0)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert_dropout={self.expert_dropout}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gate.weight.normal_(0.0, self.dim ** -0.5)
        renorm_keep_std_(self.gate.weight, dim=1)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Assignments choice-major, ``tokens * k`` of them."""
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        token, expert, weight = RF.sigmoid_top_k(torch.sigmoid(logits), self.k,
                                                 dropout=self.expert_dropout if self.training else 0.0)
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=torch.softmax(logits, dim=-1),
                           losses={"entropy_reg": marginal_entropy_loss(logits, across_processes=self.training)})
