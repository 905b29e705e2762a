"""The router skeleton: the contract every router keeps, and what they share."""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int, require_optional_positive
from moezoo.routers import functional as RF
from moezoo.routers.routing import Routing

__all__ = ["Router", "routing_stats_from", "set_routing"]


class Router(nn.Module, abc.ABC):
    """Base of every router. The contract::

        forward(x: (tokens, dim), *, token_ids=None, positions=None, capacity_groups=None) -> Routing

    - ``x`` is checked: a floating (tokens >= 1, dim) tensor, finite unless ``check_finite`` is off
      (``MoETask(nonfinite="skip")`` turns it off on every router). The check of finiteness costs a
      host synchronisation per call; turn it off for the fastest GPU training.
    - The routing math runs in fp32 outside autocast (:meth:`compute_logits`), whatever the input
      dtype.
    - ``token_ids`` and ``positions``, each (tokens,) int64, are context that only some routers use
      (hash routing); the others ignore them.
    - ``capacity_groups``: sizes of consecutive blocks of tokens summing to ``tokens``; each block
      gets its own expert capacity and priority order, while the tokens stay one routing group for
      the losses (LIMoE: per modality). Routers with a capacity take it; the others raise a
      ``ValueError``.
    - The result is one :class:`~moezoo.routers.routing.Routing`; its losses are unweighted.

    A subclass implements :meth:`route` (called after the checks) and uses the shared parts: the
    bias-free linear ``gate`` (absent with ``gate=False``), :meth:`compute_logits`,
    :meth:`current_capacity_factor` (the one train/evaluation switch), :meth:`assign` (token-choice
    top-k with capacity per block) and :meth:`update_after_step`.

    Args:
        dim: input feature size.
        num_experts: number of experts E.
        k: experts per token (None for routers without one); checked against E here, once.
        capacity_factor: training capacity C; None = no capacity.
        eval_capacity_factor: C at evaluation; None = ``capacity_factor``.
        gate: learn a bias-free linear gate ``logits = x @ W``, ``W: (dim, E)``.
        check_finite: raise a ``ValueError`` when the router input or logits hold NaN/inf.
    """

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None, gate: bool = True, check_finite: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        self.dim = require_int(name, "dim", dim)
        self.num_experts = require_int(name, "num_experts", num_experts)
        if k is not None:
            self.k = require_int(name, "k", k)
            if self.k > num_experts:
                raise ValueError(f"{name}: k must be <= num_experts={num_experts}, got k={k}")
        self.capacity_factor = require_optional_positive(name, "capacity_factor", capacity_factor)
        self.eval_capacity_factor = require_optional_positive(name, "eval_capacity_factor", eval_capacity_factor)
        self.check_finite = bool(check_finite)
        self.gate = nn.Linear(dim, num_experts, bias=False) if gate else None

    def extra_repr(self) -> str:
        k = f", k={self.k}" if hasattr(self, "k") else ""
        capacity = f", capacity_factor={self.capacity_factor}" if self.capacity_factor is not None else ""
        return f"dim={self.dim}, num_experts={self.num_experts}{k}{capacity}"

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None, positions: Tensor | None = None,
                capacity_groups: list[int] | None = None) -> Routing:
        """Route x: (tokens, dim); see the class docstring for the arguments."""
        self.check_input(x)
        if capacity_groups is not None:
            self.check_capacity_groups(capacity_groups, x.shape[0])
        return self.route(x, token_ids=token_ids, positions=positions, capacity_groups=capacity_groups)

    @abc.abstractmethod
    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """The routing decision for a checked x: (tokens, dim)."""

    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if ``x`` is not a (tokens, dim) float tensor
        (or, with ``check_finite``, holds NaN/inf)."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: x must have shape (tokens, dim={self.dim}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{name}: x has feature size {x.shape[1]}, expected dim={self.dim}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: x has no tokens (shape {tuple(x.shape)}); route at least one token")
        if not x.is_floating_point():
            raise ValueError(f"{name}: x must be a floating tensor, got dtype {x.dtype}")
        if self.gate is None and self.check_finite and not bool(torch.isfinite(x).all()):
            # A router without logits still refuses NaN/inf: it would poison the experts.
            raise ValueError(f"{name}: x is not finite (NaN or inf in the input)")

    def check_capacity_groups(self, capacity_groups: list[int], num_tokens: int) -> None:
        name = type(self).__name__
        if self.capacity_factor is None:
            raise ValueError(
                f"{name}: capacity_groups splits expert capacity, but this router has none "
                f"(capacity_factor=None)"
            )
        if sum(capacity_groups) != num_tokens or min(capacity_groups, default=0) < 1:
            raise ValueError(
                f"{name}: capacity_groups must be positive sizes summing to the {num_tokens} tokens, "
                f"got {capacity_groups}"
            )

    def compute_logits(self, x: Tensor) -> Tensor:
        """(tokens, experts) fp32 logits of the gate, computed outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise ValueError(
                f"{type(self).__name__}: router logits are not finite (NaN or inf in the input "
                "or the gate weights)"
            )
        return logits

    def current_capacity_factor(self) -> float | None:
        """C now: ``eval_capacity_factor`` at evaluation when set, else ``capacity_factor``."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def assign(self, probs: Tensor, *, capacity_groups: list[int] | None = None, group_size: int | None = None,
               priority: bool | Tensor = False, keep: Tensor | None = None, capacity_multiple_of: int | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Token-choice top-``k`` (:func:`~moezoo.routers.functional.top_k_assign`, choice-major) with
        the current capacity factor, applied per block of consecutive tokens.

        Args:
            probs: (tokens, experts) routing scores.
            capacity_groups: blocks with their own capacity and priority order (see the contract).
            group_size: else, blocks of this many tokens (the trailing tokens form one smaller
                block); None = one block.
            priority: see ``top_k_assign``'s ``batch_priority``.
            keep: optional (tokens, k) mask of choices to dispatch.
            capacity_multiple_of: round each block's capacity up to a multiple of this.

        Returns:
            token, expert, weight: (A,) each, block by block.
        """
        factor = self.current_capacity_factor()
        if factor is None:
            return RF.top_k_assign(probs, self.k, keep=keep)
        num_tokens = probs.shape[0]
        if capacity_groups is None:
            group = min(group_size or num_tokens, num_tokens)
            full = (num_tokens // group) * group
            # The full groups go through one vectorised call; the trailing block after them.
            blocks = [(0, full, group)] + ([(full, num_tokens - full, num_tokens - full)] if full < num_tokens else [])
        else:
            starts = [sum(capacity_groups[:i]) for i in range(len(capacity_groups))]
            blocks = [(start, size, size) for start, size in zip(starts, capacity_groups)]
        pieces = []
        for start, size, group in blocks:
            end = start + size
            capacity = RF.expert_capacity(group, self.num_experts, self.k, factor, multiple_of=capacity_multiple_of)
            block_priority = priority[start:end] if isinstance(priority, Tensor) else priority
            t, e, w = RF.top_k_assign(probs[start:end], self.k, capacity, block_priority,
                                      keep=None if keep is None else keep[start:end], group_size=group)
            pieces.append((t + start, e, w))
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat(parts) for parts in zip(*pieces))

    def finish(self, token: Tensor, expert: Tensor, weight: Tensor, num_tokens: int, *, logits: Tensor | None,
               probs: Tensor | None, losses: dict[str, Tensor], requested: int | None = None) -> Routing:
        """The :class:`Routing` of (A,) assignments over ``num_tokens`` rows and this router's experts,
        with the standard statistics; ``requested`` (assignments asked for before capacity)
        defaults to ``num_tokens * k``."""
        if requested is None:
            requested = num_tokens * getattr(self, "k", 1)
        stats = routing_stats_from(probs, token, expert, num_tokens, self.num_experts, requested)
        return Routing(token=token, expert=expert, weight=weight, num_tokens=num_tokens, num_experts=self.num_experts,
                       logits=logits, losses=losses, stats=stats)

    def update_after_step(self) -> None:
        """State that changes once per optimiser step, not per forward (e.g. loss-free balancing
        biases from the loads accumulated since the last step). Default: nothing."""


def set_routing(model: nn.Module, *, eval_capacity_factor: float | None = None,
                batch_priority: bool | None = None, check_finite: bool | None = None) -> None:
    """Change every router's evaluation capacity factor and/or BPR flag (V-MoE's inference knob),
    and/or its finiteness check. A token-choice router trained without capacity gets one at
    evaluation; routers that never use a capacity (sigmoid, hash, ...) ignore it.

    ``check_finite=False`` removes the one host synchronisation of every router's forward, which
    ``torch.compile(..., fullgraph=True)`` needs (see the README's "timm and Hugging Face conventions").
    """
    for router in model.modules():
        if not isinstance(router, Router):
            continue
        if eval_capacity_factor is not None:
            router.eval_capacity_factor = float(eval_capacity_factor)
        if batch_priority is not None and hasattr(router, "batch_priority"):
            router.batch_priority = bool(batch_priority)
        if check_finite is not None:
            router.check_finite = bool(check_finite)


def routing_stats_from(
    probs: Tensor | None, token: Tensor, expert: Tensor, num_tokens: int, num_experts: int, requested: int
) -> dict[str, Tensor]:
    """The detached statistics every router reports.

    Args:
        probs: (tokens, experts) router probabilities, or None (hash routing).
        token, expert: (A,) kept assignments.
        requested: assignments asked for before capacity (tokens * k for token choice).

    Returns:
        ``tokens_per_expert`` (experts,) float counts; ``dropped_fraction``: share of requested
        assignments that were dropped; ``unrouted_fraction``: share of tokens with no expert;
        ``entropy``: mean router entropy in nats (absent without probs).
    """
    with torch.no_grad():
        counts = RF.bincount(expert, num_experts).float()
        routed = torch.zeros(num_tokens, dtype=torch.bool, device=token.device)
        routed[token] = True
        stats = {
            "tokens_per_expert": counts,
            "dropped_fraction": counts.new_tensor(1.0 - token.numel() / max(requested, 1)).clamp_min(0.0),
            "unrouted_fraction": 1.0 - routed.float().mean() if num_tokens else counts.new_tensor(0.0),
        }
        if probs is not None:
            p = probs.detach().float()
            stats["entropy"] = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
    return stats
