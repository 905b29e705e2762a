"""Sorting assignments by expert: the bookkeeping every grouped expert computation needs."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sort_by_expert"]


def sort_by_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of assignments by expert, with per-expert counts and offsets, without host sync.

    ``torch.bincount`` reads the maximum back to the host on CUDA, so counts come from
    ``searchsorted`` on the sorted experts instead (no atomics, deterministic).

    Args:
        expert: (A,) int64 expert of each assignment, in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        order: (A,) int64, assignment index of each sorted position (stable: ties keep input order).
        counts: (E,) int64 assignments per expert.
        offsets: (E + 1,) int64, ``offsets[e]`` is the first sorted position of expert e and
            ``offsets[E] == A``.
    """
    order = torch.argsort(expert, stable=True)
    bounds = torch.arange(num_experts + 1, device=expert.device, dtype=expert.dtype)
    offsets = torch.searchsorted(expert[order], bounds)
    return order, offsets.diff(), offsets
