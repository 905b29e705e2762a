"""Mixture of Attention Heads' router (Zhang, Shen et al. 2022, arXiv 2210.05144) and its losses.

Reference: yikangshen/MoA ``moa_layer/parallel_linear/moe.py`` (``MoE.top_k_gating``): a zero-initialised
bias-free gate, ``softmax`` over all E experts, then the top k, whose probabilities are the combine
weights **without** renormalisation (the renormalisation line is commented out upstream).
The losses (cv, switch, z) are computed over each process's own tokens, as there: neither
``top_k_gating`` nor the criterion (``moa_loss.py``) uses a collective, so there is no global variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.routers import losses as L
from moezoo.routers.losses import moa_cv_loss
from moezoo.routers.routing import Routing
from moezoo.routers.top_k import TopKRouter

__all__ = ["MOA_LOSS_WEIGHTS", "MoARouter"]

#: The reference's default coefficients (run.sh: ``--switchloss 0.01 --zloss 0.001 --cvloss 0``),
#: under moezoo's loss names.
MOA_LOSS_WEIGHTS = {"load_balancing": 0.01, "z_loss": 0.001, "cv": 0.0}


class MoARouter(TopKRouter):
    """MoA's gate: ``softmax(x W_g)`` over E experts, the top k, weights not renormalised.

    The reference's ``top_k_gating`` exactly: the gate initialised to zero (``w_gate = zeros``);
    ``noisy`` is its ``--gating noisy`` (in training the logits get Shazeer et al.'s learned noise
    ``randn * (softplus(x W_noise) + 0.01)``, ``W_noise`` zero-initialised too); ``sample_topk`` its
    ``--sample-topk s`` (in training the last s of the k experts are drawn with ``torch.multinomial``
    from the probabilities (+1e-6) of the experts not already among the top k - s); no capacity (MoA
    never drops a token). A ``padding_mask`` (tokens,) marks tokens to skip (padded queries): their
    probabilities are zeroed, they get no assignment (their output is zero) and they leave the switch
    and cv losses; the z-loss keeps them, as the reference's.

    Assignments are choice-major over the kept tokens: every kept token's first choice, then every
    kept token's second choice, ...

    Losses (unweighted; coefficients in :data:`MOA_LOSS_WEIGHTS`): ``load_balancing`` (the
    reference's ``switchloss``: E * sum_e P_e f_e over the kept tokens, f counting all k choices),
    ``z_loss`` (``zloss``, on the logits the gate used: the noisy ones in noisy training) and ``cv``
    (:func:`moa_cv_loss`).

    Args:
        dim: input feature size.
        num_experts: E.
        k: heads (experts) per token.
        noisy: noisy gating in training.
        sample_topk: experts per token sampled in training (0: plain top-k; at most k).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, noisy: bool = False, sample_topk: int = 0,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, order="softmax_topk", normalize=False, noisy=noisy,
                         check_finite=check_finite)
        self.sample_topk = require_int(type(self).__name__, "sample_topk", sample_topk, low=0)
        if self.sample_topk > self.k:
            raise ValueError(f"MoARouter: sample_topk must be <= k={self.k}, got {sample_topk}")
        nn.init.zeros_(self.gate.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sample_topk={self.sample_topk}"

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, token_ids: Tensor | None = None,
                positions: Tensor | None = None, capacity_groups: list[int] | None = None) -> Routing:
        """Route x: (tokens, dim); ``padding_mask`` (tokens,) bool, True at tokens to skip."""
        self.check_input(x)
        if capacity_groups is not None:
            self.check_capacity_groups(capacity_groups, x.shape[0])
        if padding_mask is not None and padding_mask.shape != (x.shape[0],):
            raise ValueError(f"MoARouter: padding_mask must have shape (tokens,)=({x.shape[0]},), "
                             f"got {tuple(padding_mask.shape)}")
        return self.gate_tokens(x, padding_mask)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        return self.gate_tokens(x, None)

    def gate_tokens(self, x: Tensor, padding_mask: Tensor | None) -> Routing:
        """The reference's ``top_k_gating`` on a checked x: (tokens, dim)."""
        clean = self.compute_logits(x)
        logits = clean
        if self.noise is not None and self.training:
            with torch.autocast(device_type=x.device.type, enabled=False):
                noise_std = F.softplus(F.linear(x.float(), self.noise.weight.float())) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        probs = torch.softmax(logits, dim=-1)
        if padding_mask is not None:
            probs = probs.masked_fill(padding_mask[:, None], 0.0)
        sampled = self.sample_topk if self.training else 0
        if sampled:
            top = probs.topk(self.k - sampled, dim=1).indices
            candidates = (probs + 1e-6).detach().scatter(1, top, 0.0)
            index = torch.cat([top, torch.multinomial(candidates, sampled)], dim=1)
        else:
            index = probs.topk(self.k, dim=1).indices
        gates = probs.gather(1, index)
        kept = torch.arange(x.shape[0], device=x.device)
        if padding_mask is not None:
            kept = kept[~padding_mask]
        token = kept.repeat(self.k)
        expert, weight = index[kept].t().reshape(-1), gates[kept].t().reshape(-1)
        dense = torch.zeros_like(probs).scatter(1, index, gates)
        losses = {"load_balancing": L.load_balancing_loss(probs[kept], index[kept]),
                  "z_loss": L.z_loss(logits), "cv": moa_cv_loss(dense)}
        return self.finish(token, expert, weight, x.shape[0], logits=clean, probs=probs, losses=losses,
                           requested=kept.numel() * self.k)
