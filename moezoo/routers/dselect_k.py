"""DSelect-k (Hazimeh et al. 2021, arXiv 2106.03760): a continuously differentiable selector of at most
k experts, from binary-encoded smooth-step selectors.

Reference: google-research/google-research ``dselect_k_moe/models/dselectk_moe.py`` (``SmoothStep``,
``EntropyRegularizer``, ``DSelectKGate``), TensorFlow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moezoo.checks import require_float, require_int
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["DSelectKRouter", "binary_codes", "dselect_k_weights", "selector_outputs", "smooth_step"]


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The cubic smooth-step (Hazimeh et al. 2020, arXiv 2002.07772): 0 for ``t <= -gamma/2``, 1 for
    ``t >= gamma/2``, ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` between; continuously
    differentiable, with zero gradient outside ``(-gamma/2, gamma/2)``, so it reaches exactly 0 or 1.

    Args:
        t: any shape.
        gamma: width of the cubic region (> 0).
    """
    cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(num_experts: int) -> Tensor:
    """(experts, ceil(log2 experts)) bool: row l is l in binary, most significant bit first (as
    ``np.binary_repr`` in the reference)."""
    bits = math.ceil(math.log2(num_experts))
    powers = 2 ** torch.arange(bits - 1, -1, -1)
    return (torch.arange(num_experts).unsqueeze(-1) // powers) % 2 == 1


def selector_outputs(z: Tensor, codes: Tensor, gamma: float = 1.0) -> Tensor:
    """Each single-expert selector's distribution over the experts:
    ``r(z)_l = prod_j (S(z_j) if bit j of l else 1 - S(z_j))``.

    Args:
        z: (..., k, bits) selector logits.
        codes: (experts, bits) bool, :func:`binary_codes`.

    Returns:
        (..., k, experts); each row sums to 1 when experts is a power of 2 (else to at most 1:
        codes >= experts are unreachable).
    """
    s = smooth_step(z, gamma).unsqueeze(-2)  # (..., k, 1, bits)
    return torch.where(codes, s, 1.0 - s).prod(dim=-1)


def dselect_k_weights(z: Tensor, w: Tensor, codes: Tensor, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """DSelect-k's mixture weights ``alpha = sum_i softmax(w)_i r(z^(i))``, at most k non-zero once
    every smooth step is 0 or 1.

    Args:
        z: (..., k, bits) selector logits.
        w: (..., k) selector-weight logits.
        codes: (experts, bits) bool.

    Returns:
        weights (..., experts) and the selector outputs (..., k, experts).
    """
    r = selector_outputs(z, codes, gamma)
    return (torch.softmax(w, dim=-1).unsqueeze(-1) * r).sum(dim=-2), r


class DSelectKRouter(Router):
    """DSelect-k gate as a router: k single-expert selectors, each a binary code of
    ``ceil(log2 E)`` smooth steps, mixed by a softmax over k selector weights.

    Per token (the reference's example-conditioned gate): ``z = x A + a`` reshaped to (k, bits) and
    ``w = x B + b``, both initialised as the reference (z's kernel and bias U(-gamma/100, gamma/100),
    w's U(-0.05, 0.05), Keras' default). Task-only (``per_token=False``, the reference's static
    gate): z (k, bits) and w (k,) are parameters and every token gets the same weights; multi-task
    models give each task its own router over shared experts.

    The assignments are the (token, expert) pairs with a non-zero weight (a host synchronisation):
    in training all reachable experts until the smooth steps saturate, then at most k per token
    (fewer when selectors coincide), with the exact weights and the exact gradient of the smooth
    gate. No capacity.

    Losses (unweighted): ``selector_entropy``, the entropy of the selector outputs
    (:func:`~moezoo.routers.losses.selector_entropy_loss`, summed over selectors, mean over tokens;
    its coefficient sets how fast the selectors become binary); when E is not a power of 2,
    ``unreachable``, the reference's ``sum 1 / sum_l r_l`` over selectors (mean over tokens), which
    keeps the unreachable codes from taking a selector (the reference adds it with coefficient 1).

    Args:
        dim: input feature size.
        num_experts: E (>= 2).
        k: selectors, the most experts a token uses.
        gamma: smooth-step width (> 0; reference default 1).
        per_token: example-conditioned (True) or task-only (False) gate.
        check_finite: see :class:`~moezoo.routers.base.Router`.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, gamma: float = 1.0, per_token: bool = True,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, gate=False, check_finite=check_finite)
        name = type(self).__name__
        require_int(name, "num_experts", num_experts, low=2)
        self.gamma = require_float(name, "gamma", gamma, strict=True)
        self.per_token = bool(per_token)
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)
        self.bits = self.codes.shape[1]
        if self.per_token:
            self.z_logits = nn.Linear(dim, self.k * self.bits)
            self.w_logits = nn.Linear(dim, self.k)
        else:
            self.z_logits = nn.Parameter(torch.empty(self.k, self.bits))
            self.w_logits = nn.Parameter(torch.empty(self.k))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, per_token={self.per_token}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        z = [self.z_logits.weight, self.z_logits.bias] if self.per_token else [self.z_logits]
        w = [self.w_logits.weight, self.w_logits.bias] if self.per_token else [self.w_logits]
        for p in z:
            p.uniform_(-self.gamma / 100, self.gamma / 100)
        for p in w:
            p.uniform_(-0.05, 0.05)

    def selector_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 ``z`` (tokens, k, bits) and ``w`` (tokens, k) for x: (tokens, dim), outside autocast."""
        num_tokens = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.per_token:
                x = x.float()
                z = self.z_logits(x).view(num_tokens, self.k, self.bits)
                w = self.w_logits(x)
            else:
                z = self.z_logits.float().expand(num_tokens, self.k, self.bits)
                w = self.w_logits.float().expand(num_tokens, self.k)
        return z, w

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        z, w = self.selector_logits(x)
        weights, r = dselect_k_weights(z, w, self.codes, self.gamma)
        token, expert = torch.nonzero(weights.detach(), as_tuple=True)
        losses = {"selector_entropy": L.selector_entropy_loss(r)}
        if self.num_experts != 2 ** self.bits:
            losses["unreachable"] = (1.0 / r.sum(dim=-1)).sum(dim=-1).mean()
        return self.finish(token, expert, weights[token, expert], x.shape[0], logits=None, probs=weights,
                           losses=losses)
