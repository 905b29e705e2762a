"""A MoE layer shared by several modalities (LIMoE): one router and one set of experts, capacity and
auxiliary losses per modality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moezoo.layers.experts import Experts
from moezoo.layers.moe import RouterFactory
from moezoo.layers.routed import RoutedLayer
from moezoo.routers import losses as L
from moezoo.routers.batch_prioritized import BatchPrioritizedRouter
from moezoo.routers.routing import Routing

__all__ = ["MultimodalMoE"]


class MultimodalMoE(RoutedLayer):
    """``forward({"image": (n_i, dim), "text": (n_t, dim)}) -> same keys, same shapes``.

    Every modality's tokens are routed by the same router, but separately: the router's capacity
    (and, with BPR, its priority order) applies per modality, as LIMoE does, so the many image tokens
    cannot crowd the few text tokens out of the expert buffers. All tokens then go through the same
    experts in one expert computation.

    Losses, per modality m: the router's own (``m/importance``, ``m/load`` for V-MoE's router) and
    LIMoE's ``m/local_entropy`` and ``m/global_entropy`` (thresholded when ``entropy_thresholds[m]``
    is set). Stats: the router's, plus ``m/tokens_per_expert`` for the specialisation analysis.

    Args:
        dim, hidden, num_experts: expert sizes.
        router: module or factory ``(dim, num_experts) -> router``; default V-MoE's BPR router, k=1.
        entropy_thresholds: tau per modality for the global entropy loss (nats); absent = plain loss.
        activation, dropout, backend: the experts (see :class:`Experts`).
        aux_loss_weights: coefficient per loss name, e.g. ``{"text/global_entropy": 0.01}``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 8,
        router: nn.Module | RouterFactory | None = None,
        *,
        entropy_thresholds: Mapping[str, float] | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        backend: str = "auto",
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(aux_loss_weights)
        if router is None:
            router = BatchPrioritizedRouter(dim, num_experts, k=1)
        elif not isinstance(router, nn.Module):
            router = router(dim, num_experts)
        self.router = router
        self.experts = Experts(num_experts, dim, hidden, activation, dropout=dropout, backend=backend)
        self.num_experts = num_experts
        self.entropy_thresholds = dict(entropy_thresholds or {})

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """inputs: modality -> (tokens_m, dim); empty modalities are skipped."""
        names = [m for m, x in inputs.items() if x is not None and x.shape[0] > 0]
        if not names:
            return {m: x for m, x in inputs.items()}
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        tokens, experts, weights, rows = [], [], [], []
        offset = 0
        for m in names:
            x = inputs[m]
            routing = self.router(x)
            for key, value in routing.losses.items():
                losses[f"{m}/{key}"] = value
            if routing.logits is not None:
                probs = torch.softmax(routing.logits, dim=-1)
                losses[f"{m}/local_entropy"] = L.local_entropy_loss(probs)
                losses[f"{m}/global_entropy"] = L.global_entropy_loss(probs, self.entropy_thresholds.get(m))
            stats[f"{m}/tokens_per_expert"] = routing.stats["tokens_per_expert"]
            stats[f"{m}/dropped_fraction"] = routing.stats["dropped_fraction"]
            tokens.append(routing.token + offset)
            experts.append(routing.expert)
            weights.append(routing.weight)
            rows.append(x)
            offset += x.shape[0]
        merged = Routing(torch.cat(tokens), torch.cat(experts), torch.cat(weights), offset, self.num_experts)
        out = self.experts(torch.cat(rows), merged)
        stats["tokens_per_expert"] = merged.tokens_per_expert().float()
        requested = sum(inputs[m].shape[0] for m in names) * getattr(self.router, "k", 1)
        stats["dropped_fraction"] = torch.tensor(1.0 - merged.num_assignments / max(requested, 1))
        self.record(losses, stats)
        results = dict(inputs)
        for m, piece in zip(names, out.split([inputs[m].shape[0] for m in names])):
            results[m] = piece
        return results
