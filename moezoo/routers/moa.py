"""Mixture of Attention Heads' router (Zhang, Shen et al. 2022, arXiv 2210.05144) and its losses.

Reference: yikangshen/MoA ``moa_layer/parallel_linear/moe.py`` (``MoE.top_k_gating``): a zero-initialised
bias-free gate, ``softmax`` over all E experts, then the top k, whose probabilities are the combine
weights **without** renormalisation (the renormalisation line is commented out upstream).
"""

from __future__ import annotations

from torch import Tensor, nn

from moezoo.routers.losses import moa_cv_loss
from moezoo.routers.routing import Routing
from moezoo.routers.top_k import TopKRouter

__all__ = ["MOA_LOSS_WEIGHTS", "MoARouter"]

#: The reference's default coefficients (run.sh: ``--switchloss 0.01 --zloss 0.001 --cvloss 0``),
#: under moezoo's loss names.
MOA_LOSS_WEIGHTS = {"load_balancing": 0.01, "z_loss": 0.001, "cv": 0.0}


class MoARouter(TopKRouter):
    """MoA's gate: ``softmax(x W_g)`` over E experts, the top k, weights not renormalised.

    A :class:`TopKRouter` in ``softmax_topk`` order with no capacity (MoA never drops a token) and
    the gate initialised to zero, as the reference (``w_gate = zeros``); ``noisy`` is the reference's
    ``--gating noisy`` (Shazeer et al.'s learned softplus noise, its weights zero-initialised too).

    Losses (unweighted; coefficients in :data:`MOA_LOSS_WEIGHTS`): ``load_balancing`` (the
    reference's ``switchloss``: E * sum_e P_e f_e with f counting all k choices), ``z_loss``
    (``zloss``, on the clean logits) and ``cv`` (:func:`moa_cv_loss`).

    Args:
        dim: input feature size.
        num_experts: E.
        k: heads (experts) per token.
        noisy: noisy gating in training.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, noisy: bool = False,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, order="softmax_topk", normalize=False, noisy=noisy,
                         check_finite=check_finite)
        nn.init.zeros_(self.gate.weight)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Assignments are choice-major (every token's first choice, then every token's second
        choice, ...), ``tokens * k`` of them."""
        routing = super().route(x, token_ids=token_ids, positions=positions, capacity_groups=capacity_groups)
        routing.losses["cv"] = moa_cv_loss(routing.dense_weights())
        return routing
