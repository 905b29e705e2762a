"""V-MoE's router: noisy top-k per group of tokens with Batch Prioritized Routing (BPR)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["VMOE_LOSS_WEIGHTS", "BatchPrioritizedRouter", "bpr_router_factory"]

#: V-MoE's coefficients (google-research/vmoe ``vmoe/configs/vmoe_paper/common.py``: importance and
#: load weight 0.005 each).
VMOE_LOSS_WEIGHTS = {"importance": 0.005, "load": 0.005}

_PRIORITIES = ("max", "sum")


class BatchPrioritizedRouter(Router):
    """V-MoE's ``NoisyTopExpertsPerItemRouter`` (Riquelme et al. 2021), faithful to google-research/vmoe.

    1. ``logits = x @ W`` (no bias); in training ``noisy = logits + N(0, (noise_std / E)^2)``.
    2. ``g = softmax(noisy)`` (clean logits at evaluation), then top-k; the combine weights are the
       raw probabilities, not renormalised.
    3. Tokens are routed in groups of ``group_size`` consecutive tokens (V-MoE: 8 images). Each
       expert has ``ceil(k * group_size * C / E)`` places per group, rounded up to a multiple of
       ``capacity_multiple_of``. All first choices claim places before any second choice; with
       ``batch_priority`` tokens claim in order of priority (their largest probability, highest
       first), otherwise in position order. Assignments past capacity are dropped.

    Args:
        dim: input feature size.
        num_experts: E (paper: 32).
        k: experts per token (paper: 2).
        noise_std: the config value; the noise std is ``noise_std / E`` (V-MoE: 1.0 -> 1/E). 0 = no noise.
        capacity_factor: C during training (paper: 1.05).
        eval_capacity_factor: C at evaluation (None: same as training). Lowering it with BPR is
            the paper's inference-compute knob.
        batch_priority: Batch Prioritized Routing on/off (off = "vanilla" routing).
        group_size: tokens per routing group (None: all tokens form one group). When the token
            count is not a multiple, the trailing tokens form one smaller group.
        capacity_multiple_of: V-MoE rounds capacity up to a multiple of 4.
        priority: BPR score, ``"max"`` (the reference: top-1 probability) or ``"sum"`` (sum of
            the top-k probabilities, the paper's alternative).
        normalize: rescale each token's top-k weights to sum to 1 (not in V-MoE; sparse upcycling
            uses it so an upcycled model starts equal to its dense parent).
        ensemble_size: M members of an efficient ensemble of experts (E^3, Allingham et al. 2021;
            vmoe's ``NoisyTopExpertsPerItemEnsembleRouter``). The experts are split into M
            consecutive blocks of E/M; token i of a group belongs to member ``i % M`` (the caller
            interleaves the members' copies of each token) and is routed by a softmax over its
            member's experts only, with noise std ``noise_std / (E / M)``. Capacity and priority
            are those of the whole group; the losses are computed per member and averaged.
            ``Routing.logits`` then holds -inf for the other members' experts.

    Losses (unweighted, averaged over groups): ``importance`` (clean softmax) always, ``load``
    when noise is applied (training with ``noise_std > 0``). V-MoE weighs each by 0.005.
    """

    def __init__(self, dim: int, num_experts: int = 32, k: int = 2, *, noise_std: float = 1.0,
                 capacity_factor: float = 1.05, eval_capacity_factor: float | None = None,
                 batch_priority: bool = True, group_size: int | None = None, capacity_multiple_of: int | None = 4,
                 priority: str = "max", normalize: bool = False, ensemble_size: int = 1,
                 check_finite: bool = True) -> None:
        if capacity_factor is None:
            raise ValueError(f"{type(self).__name__}: capacity_factor must be a number > 0, got None")
        super().__init__(dim, num_experts, k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, check_finite=check_finite)
        name = type(self).__name__
        self.noise_std = require_float(name, "noise_std", noise_std)
        self.batch_priority = bool(batch_priority)
        self.group_size = None if group_size is None else require_int(name, "group_size", group_size)
        self.capacity_multiple_of = None if capacity_multiple_of is None else require_int(
            name, "capacity_multiple_of", capacity_multiple_of, low=0)
        if priority not in _PRIORITIES:
            raise ValueError(f"{name}: priority must be one of {_PRIORITIES}, got {priority!r}")
        self.priority = priority
        self.normalize = bool(normalize)
        self.ensemble_size = require_int(name, "ensemble_size", ensemble_size)
        if num_experts % self.ensemble_size:
            raise ValueError(f"{name}: num_experts={num_experts} must be a multiple of ensemble_size={ensemble_size}")
        if self.ensemble_size > 1 and self.k > num_experts // self.ensemble_size:
            raise ValueError(f"{name}: k must be <= num_experts={num_experts} / ensemble_size={ensemble_size}, got k={k}")
        if self.group_size is not None and self.group_size % self.ensemble_size:
            raise ValueError(f"{name}: group_size={group_size} must be a multiple of ensemble_size={ensemble_size}")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, noise_std={self.noise_std}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"batch_priority={self.batch_priority}, group_size={self.group_size}"
            + (f", ensemble_size={self.ensemble_size}" if self.ensemble_size > 1 else "")
        )

    def _members(self, t: Tensor) -> Tensor:
        """(groups, S, E) -> (groups, M, S/M, E/M): each member's tokens and experts (M = 1: a view)."""
        m = self.ensemble_size
        groups, size, experts = t.shape
        blocks = t.reshape(groups, size // m, m, m, experts // m)
        return torch.diagonal(blocks, dim1=2, dim2=3).permute(0, 3, 1, 2)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Tokens are grouped consecutively. ``capacity_groups`` splits only the expert buffers: each
        block gets its own capacity and priority order (LIMoE: per modality), while the tokens form
        one routing group for the auxiliary losses. It replaces ``group_size``."""
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        members = self.ensemble_size
        if members > 1:
            if num_tokens % members or capacity_groups is not None:
                raise ValueError(f"{type(self).__name__}: with ensemble_size={members} the {num_tokens} tokens must be "
                                 "whole copies per member, and capacity_groups cannot be used")
            member = torch.arange(num_tokens, device=x.device) % members
            owner = torch.arange(num_experts, device=x.device) // (num_experts // members)
            logits = logits.masked_fill(member[:, None] != owner[None, :], float("-inf"))
        sigma = self.noise_std / (num_experts // members)
        noisy = self.training and sigma > 0
        dispatch_logits = logits + sigma * torch.randn_like(logits) if noisy else logits
        probs = torch.softmax(dispatch_logits, dim=-1)

        priority: bool | Tensor = self.batch_priority
        if self.batch_priority and self.priority == "sum":
            priority = RF.top_k(probs, self.k)[0].sum(dim=1)
        token, expert, weight = self.assign(probs, capacity_groups=capacity_groups, group_size=self.group_size,
                                            priority=priority, capacity_multiple_of=self.capacity_multiple_of)
        if capacity_groups is not None:
            group = full = num_tokens  # one routing group for the losses
        else:
            group = min(self.group_size or num_tokens, num_tokens)
            full = (num_tokens // group) * group

        def per_group(t: Tensor) -> list[Tensor]:
            parts = [t[:full].view(-1, group, num_experts)] if full else []
            return parts + ([t[full:].unsqueeze(0)] if full < num_tokens else [])

        def group_mean(loss_fn, *tensors: Tensor) -> Tensor:
            # Per-group (and per-member) losses, averaged over groups (a smaller trailing group
            # counts once).
            chunks = list(zip(*(per_group(t) for t in tensors)))
            values = [loss_fn(*(self._members(t) for t in c)) * c[0].shape[0] for c in chunks]
            return torch.stack(values).sum() / sum(c[0].shape[0] for c in chunks)

        if self.normalize:
            weight = weight / RF.top_k(probs, self.k)[0].sum(dim=1)[token]
        clean_probs = torch.softmax(logits, dim=-1) if noisy else probs
        losses = {"importance": group_mean(L.importance_loss, clean_probs)}
        if noisy:
            losses["load"] = group_mean(lambda a, b: L.load_loss(a, b, sigma, self.k), logits, dispatch_logits)
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=probs,
                           losses=losses)


def bpr_router_factory(k: int = 2, **kwargs) -> Callable[[int, int], BatchPrioritizedRouter]:
    """A router factory ``(dim, num_experts) -> BatchPrioritizedRouter(dim, num_experts, k, **kwargs)``
    (a ``functools.partial``: its settings stay inspectable in ``.keywords``)."""
    return partial(BatchPrioritizedRouter, k=k, **kwargs)
