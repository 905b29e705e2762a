"""A MoE layer shared by several modalities (LIMoE): one router and one set of experts, capacity and
auxiliary losses per modality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moezoo.layers.experts import Experts
from moezoo.layers.moe import RouterFactory, resolve_router
from moezoo.layers.routed import RoutedLayer
from moezoo.routers import losses as L
from moezoo.routers.batch_prioritized import BatchPrioritizedRouter
from moezoo.routers.functional import bincount

__all__ = ["MultimodalMoE"]


class MultimodalMoE(RoutedLayer):
    """``forward({"image": (n_i, dim), "text": (n_t, dim)}) -> same keys, same shapes``.

    As LIMoE: the tokens of all modalities form one routing group for one router and one set of
    experts, but the expert buffers are split per modality (each modality gets its own capacity and,
    with BPR, its own priority order), so the many image tokens cannot crowd the few text tokens out.
    V-MoE's auxiliary losses are computed over the whole group, which a modality can satisfy while
    the other collapses; LIMoE's entropy losses are computed per modality m:
    ``m/local_entropy`` and ``m/global_entropy`` (thresholded when ``entropy_thresholds[m]`` is set).
    In training the entropy losses are over the tokens of every process (the paper, arXiv 2206.02770
    Sec. 3.1, averages over the batch's tokens of modality m; LIMoE's code is not public), so every
    process must route the same modalities at the same point. V-MoE's importance and load losses stay
    per routing group, hence per process, as V-MoE's code (google-research/vmoe) computes them per group.
    Stats: the router's, plus ``m/tokens_per_expert`` for the specialisation analysis.

    Args:
        dim, hidden, num_experts: expert sizes.
        router: a router with a capacity (or a factory for one), whose ``capacity_groups`` splits the
            buffers per modality; default V-MoE's BPR router, k=1.
        entropy_thresholds: tau per modality for the global entropy loss (nats); absent = plain loss.
        activation, dropout, backend, bfloat16_dispatch: the experts (see
            :class:`~moezoo.layers.experts.Experts`).
        aux_loss_weights: coefficient per loss name, e.g. ``{"text/global_entropy": 0.01}``.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 8, router: nn.Module | RouterFactory | None = None, *,
                 entropy_thresholds: Mapping[str, float] | None = None, activation: str = "gelu", dropout: float = 0.0,
                 backend: str = "auto", bfloat16_dispatch: bool = False,
                 aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(aux_loss_weights)
        router = resolve_router("MultimodalMoE", router, dim, num_experts,
                                lambda: BatchPrioritizedRouter(dim, num_experts, k=1))
        if getattr(router, "capacity_factor", None) is None:
            raise ValueError(
                f"MultimodalMoE: the router must have a capacity (per-modality buffers), got {type(router).__name__} "
                "with capacity_factor=None"
            )
        self.router = router
        self.experts = Experts(dim, hidden, num_experts, activation, dropout=dropout, backend=backend,
                               bfloat16_dispatch=bfloat16_dispatch)
        self.entropy_thresholds = dict(entropy_thresholds or {})

    @property
    def num_experts(self) -> int:
        """E (owned by the expert bank)."""
        return self.experts.num_experts

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """inputs: modality -> (tokens_m, dim); empty modalities are skipped."""
        names = [m for m, x in inputs.items() if x is not None and x.shape[0] > 0]
        if not names:
            return dict(inputs)
        sizes = [inputs[m].shape[0] for m in names]
        tokens = torch.cat([inputs[m] for m in names])
        routing = self.router(tokens, capacity_groups=sizes)
        losses = dict(routing.losses)
        stats = dict(routing.stats)
        probs = torch.softmax(routing.logits, dim=-1)
        modality = torch.repeat_interleave(torch.arange(len(names), device=tokens.device),
                                           torch.tensor(sizes, device=tokens.device))
        for i, (m, p) in enumerate(zip(names, probs.split(sizes))):
            # In training over every process's tokens (LIMoE's batch is the global batch); per process
            # in evaluation, where the losses are unused and no process may be waited for.
            losses[f"{m}/local_entropy"] = L.local_entropy_loss(p, across_processes=self.training)
            losses[f"{m}/global_entropy"] = L.global_entropy_loss(p, self.entropy_thresholds.get(m),
                                                                  across_processes=self.training)
            mine = modality[routing.token] == i
            stats[f"{m}/tokens_per_expert"] = bincount(routing.expert[mine], self.num_experts).float()
        out = self.experts(tokens, routing)
        self.record(losses, stats)
        results = dict(inputs)
        for m, piece in zip(names, out.split(sizes)):
            results[m] = piece
        return results
