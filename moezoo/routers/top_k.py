"""Token-choice top-k routing: Switch (k=1), GShard, Shazeer's noisy top-k, Mixtral."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["TopKRouter"]

_ORDERS = ("softmax_topk", "topk_softmax")


class TopKRouter(Router):
    """Each token picks its k highest-scoring experts.

    Args:
        dim: input feature size.
        num_experts: number of experts E.
        k: experts per token (Switch Transformer is ``k=1``).
        order: ``"softmax_topk"`` (GShard, Switch, V-MoE: softmax over all experts, then top-k;
            weights are those probabilities) or ``"topk_softmax"`` (Mixtral: top-k logits, then a
            softmax over just those, so each token's weights sum to 1).
        normalize: with ``softmax_topk``, rescale each token's top-k probabilities to sum to 1.
        scale: multiply every combine weight by this (DeepSeek-V2's ``routed_scaling_factor``).
        capacity_factor: training capacity C (places per expert ``ceil(k*tokens*C/E)``); beyond it
            assignments are dropped in token order, all first choices before second choices.
            ``None``: no capacity, nothing dropped. ``capacity_groups`` gives blocks their own.
        eval_capacity_factor: C at evaluation; ``None`` uses ``capacity_factor``.
        capacity_multiple_of: round capacity up to this multiple.
        jitter: Switch's input jitter: in training, x is multiplied by U(1-jitter, 1+jitter).
        noisy: Shazeer et al. 2017's noisy top-k gating: in training the logits get Gaussian noise
            with a learned per-expert std ``softplus(x @ W_noise)``; adds the importance and load
            losses.
        random_second: GShard's random routing (k=2, training): the second expert is used with
            probability ``min(1, 2 * w2)``, w2 its weight renormalised over the top two.
        global_balance: add Qwen's global-batch balancing loss ``global_load_balancing``
            (:func:`~moezoo.routers.losses.global_load_balancing_loss`): in training the expert
            frequencies count the top-k choices of every forward since the last optimiser step
            (the micro-batches of gradient accumulation; :meth:`update_after_step` restarts them)
            and of every process (all-reduced: every process must route at the same point, as under
            DDP/FSDP); at evaluation only this forward's, on this process.
        mutual_information: add ModuleFormer's ``mutual_information`` loss
            (:func:`~moezoo.routers.losses.mutual_information_loss` of the clean logits, per token).

    Losses (unweighted): ``load_balancing`` (Switch/GShard) and ``z_loss`` always; ``importance``
    and ``load`` when ``noisy``; ``global_load_balancing`` and ``mutual_information`` when asked for.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 2,
        *,
        order: str = "softmax_topk",
        normalize: bool = False,
        scale: float = 1.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        capacity_multiple_of: int | None = None,
        jitter: float = 0.0,
        noisy: bool = False,
        random_second: bool = False,
        global_balance: bool = False,
        mutual_information: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(dim, num_experts, k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, check_finite=check_finite)
        name = type(self).__name__
        if order not in _ORDERS:
            raise ValueError(f"{name}: order must be one of {_ORDERS}, got {order!r}")
        if random_second and self.k != 2:
            raise ValueError(f"{name}: random_second (GShard) needs k=2, got k={k}")
        self.order = order
        self.normalize = bool(normalize)
        self.scale = require_float(name, "scale", scale, strict=True)
        self.capacity_multiple_of = None if capacity_multiple_of is None else require_int(
            name, "capacity_multiple_of", capacity_multiple_of)
        self.jitter = require_float(name, "jitter", jitter, below=1.0)
        self.random_second = bool(random_second)
        self.global_balance = bool(global_balance)
        self.mutual_information = bool(mutual_information)
        # A plain attribute, not a buffer (as SigmoidRouter's pending load): DDP would broadcast a
        # buffer from rank 0. None at every step boundary, where checkpoints are taken.
        self.pending_counts: Tensor | None = None
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}, normalize={self.normalize}, noisy={self.noise is not None}"

    def update_after_step(self) -> None:
        """The global-batch frequencies restart with the next optimiser step."""
        self.pending_counts = None

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        losses: dict[str, Tensor] = {}

        select_logits = logits
        if self.noise is not None and self.training:
            with torch.autocast(device_type=x.device.type, enabled=False):
                noise_std = F.softplus(F.linear(x.float(), self.noise.weight.float())) + 1e-2
            select_logits = logits + torch.randn_like(logits) * noise_std
            losses["load"] = L.load_loss(logits, select_logits, noise_std, self.k)
        probs = torch.softmax(select_logits, dim=-1)

        top_index = RF.top_k(probs, self.k)[1]
        keep = None
        if self.random_second and self.training:
            top2 = probs.gather(1, top_index)
            second = top2[:, 1] / top2.sum(dim=1)
            keep = torch.ones_like(top_index, dtype=torch.bool)
            keep[:, 1] = torch.rand_like(second) < 2.0 * second.detach()

        token, expert, weight = self.assign(probs, capacity_groups=capacity_groups, keep=keep,
                                            capacity_multiple_of=self.capacity_multiple_of)

        if self.order == "topk_softmax":
            # Mixtral: softmax over the selected logits only.
            top_lse = torch.logsumexp(select_logits.gather(1, top_index), dim=1)
            weight = torch.exp(select_logits[token, expert] - top_lse[token])
        elif self.normalize:
            weight = weight / probs.gather(1, top_index).sum(dim=1)[token]
        if self.scale != 1.0:
            weight = weight * self.scale

        losses["load_balancing"] = L.load_balancing_loss(probs, top_index)
        losses["z_loss"] = L.z_loss(logits)
        if self.global_balance:
            losses["global_load_balancing"] = L.global_load_balancing_loss(
                probs, top_index, self.pending_counts if self.training else None, across_processes=self.training)
            if self.training:
                counts = RF.bincount(top_index, num_experts).float()
                self.pending_counts = counts if self.pending_counts is None else self.pending_counts + counts
        if self.mutual_information:
            losses["mutual_information"] = L.mutual_information_loss(logits)
        if self.noise is not None:
            gates = torch.zeros_like(probs).index_put((token, expert), weight, accumulate=True)
            losses["importance"] = L.importance_loss(gates)
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=probs,
                           losses=losses)
