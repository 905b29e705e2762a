"""Which blocks of a transformer get an MoE layer, counted as the papers' reference code does."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["moe_block_indices"]


def moe_block_indices(depth: int, placement: str | Sequence[int]) -> list[int]:
    """Indices (0-based) of the blocks whose MLP becomes an MoE, counted as the reference does.

    ``"every_n"``: blocks n-1, 2n-1, ... (``every_2`` = every odd block). ``"last_n"``: the last n
    **odd** blocks (vmoe counts "Last n" over odd blocks: depth 8, last_2 -> 5, 7).
    ``"final_n"``: the last n consecutive blocks (Soft MoE's placement). ``"none"``, or an explicit
    list of indices.
    """
    if not isinstance(placement, str):
        indices = sorted({int(i) for i in placement})
        if any(not 0 <= i < depth for i in indices):
            raise ValueError(f"moe_blocks indices must be in [0, depth={depth}), got {list(placement)}")
        return indices
    if placement == "none":
        return []
    kind, _, count = placement.partition("_")
    if kind not in ("every", "last", "final") or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"moe_blocks must be 'every_<n>', 'last_<n>', 'final_<n>', 'none' or a list of block "
            f"indices, got {placement!r}"
        )
    n = int(count)
    if kind == "every":
        return list(range(n - 1, depth, n))
    if kind == "last":
        odd = list(range(1, depth, 2))
        if n > len(odd):
            raise ValueError(f"moe_blocks={placement!r}: only {len(odd)} odd blocks in depth {depth}")
        return odd[-n:]
    if n > depth:
        raise ValueError(f"moe_blocks={placement!r}: only {depth} blocks")
    return list(range(depth - n, depth))
