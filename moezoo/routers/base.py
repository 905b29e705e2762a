"""What every learned router shares: a bias-free linear gate evaluated in fp32, input checks, stats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.routers.routing import Routing

__all__ = ["Router", "routing_stats_from"]


def _require_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _require_float(name: str, value: object, low: float = 0.0, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _optional_capacity(name: str, value: object) -> float | None:
    if value is None:
        return None
    return _require_float(name, value, 0.0, strict=True)


class Router(nn.Module):
    """Base class of the learned routers: ``logits = x @ W`` with ``W: (dim, experts)``, no bias.

    Subclasses implement ``forward(x: (tokens, dim), *, token_ids=None, positions=None) -> Routing``;
    ``token_ids`` and ``positions`` ((tokens,) int64) are context that only some routers use.
    The routing math runs in fp32 whatever the input dtype or autocast state.

    Args:
        dim: input feature size.
        num_experts: number of experts.
        check_finite: raise a ``ValueError`` when the router input or logits hold NaN/inf. It costs
            one host synchronisation per call; turn it off for the fastest GPU training.
    """

    def __init__(self, dim: int, num_experts: int, *, check_finite: bool = True) -> None:
        super().__init__()
        self.dim = _require_int("dim", dim)
        self.num_experts = _require_int("num_experts", num_experts)
        self.check_finite = bool(check_finite)
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}"

    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if ``x`` is not a finite (tokens, dim) float tensor."""
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

    def update_after_step(self) -> None:
        """State that changes once per optimiser step, not per forward (e.g. loss-free balancing
        biases from the loads accumulated since the last step). Default: nothing."""

    def compute_logits(self, x: Tensor) -> Tensor:
        """(tokens, experts) fp32 logits, computed outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise ValueError(
                f"{type(self).__name__}: router logits are not finite (NaN or inf in the input "
                "or the gate weights)"
            )
        return logits


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
        counts = torch.bincount(expert, minlength=num_experts).float()
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


def finish_routing(
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    *,
    num_tokens: int,
    num_experts: int,
    requested: int,
    logits: Tensor | None,
    probs: Tensor | None,
    losses: dict[str, Tensor],
) -> Routing:
    """Assemble a :class:`Routing` with the standard statistics."""
    return Routing(
        token=token,
        expert=expert,
        weight=weight,
        num_tokens=num_tokens,
        num_experts=num_experts,
        logits=logits,
        losses=losses,
        stats=routing_stats_from(probs, token, expert, num_tokens, num_experts, requested),
    )
