"""Dense training, sparse inference (DS-MoE, Pan et al. 2024, arXiv 2404.05567)."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["DenseTrainingRouter"]


class DenseTrainingRouter(Router):
    """DS-MoE's router: every expert in training, top-k at evaluation.

    ``probs = softmax(x @ W)``. In training every token reaches every expert with weight
    ``probs[t, e]`` (the layer is a dense, softly gated mixture, and every expert and the router
    get a gradient from every token). At evaluation each token keeps its k most probable experts,
    weighted by those probabilities (renormalised to sum to 1 with ``normalize``). The
    ``mutual_information`` loss (:func:`~moezoo.routers.losses.mutual_information_loss`, the same
    loss as ModuleFormer's) makes the routing sharp enough for
    that top-k to lose little; the paper weights it by 0.01.

    Args:
        dim: input feature size.
        num_experts: E.
        k: experts per token at evaluation.
        normalize: renormalise the k evaluation weights of a token to sum to 1.
        check_finite: refuse NaN/inf inputs and logits.

    Losses (unweighted): ``mutual_information`` and ``z_loss``.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, normalize: bool = False,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        probs = torch.softmax(logits, dim=-1)
        if self.training:
            # Expert-major: all tokens of expert 0, then of expert 1, ... (the bank sorts anyway).
            token = torch.arange(num_tokens, device=x.device).repeat(num_experts)
            expert = torch.arange(num_experts, device=x.device).repeat_interleave(num_tokens)
            weight = probs.t().reshape(-1)
            requested = num_tokens * num_experts
        else:
            token, expert, weight = RF.top_k_assign(probs, self.k)
            if self.normalize:
                weight = weight / RF.top_k(probs, self.k)[0].sum(dim=1)[token]
            requested = None
        losses = {"mutual_information": L.mutual_information_loss(logits), "z_loss": L.z_loss(logits)}
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=probs, losses=losses,
                           requested=requested)
