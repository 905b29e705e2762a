"""DeepSeekMoE's fine-grained expert segmentation and shared-expert isolation (Dai et al. 2024,
arXiv 2401.06066), as a configuration of :class:`~moezoo.layers.moe.MoE`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moezoo.checks import require_int
from moezoo.layers.moe import MoE
from moezoo.routers.top_k import TopKRouter

__all__ = ["FineGrainedConfig", "fine_grained_config", "fine_grained_moe"]


@dataclass(frozen=True)
class FineGrainedConfig:
    """The expert layout of a DeepSeekMoE layer (see :func:`fine_grained_config`).

    Attributes:
        num_experts: routed experts, ``m E - K_s``.
        k: routed experts per token, ``m k - K_s``.
        hidden: width of each routed and each shared expert, ``h / m``.
        shared_experts: ungated always-on experts ``K_s``.
    """

    num_experts: int
    k: int
    hidden: int
    shared_experts: int


def fine_grained_config(num_experts: int, k: int, hidden: int, granularity: int, shared_experts: int = 0
                        ) -> FineGrainedConfig:
    """DeepSeekMoE's layout for a top-k MoE of E experts of width h.

    Fine-grained segmentation splits every expert into m experts of width ``h / m``: ``m E`` experts
    with ``m k`` active. Shared-expert isolation then makes ``K_s`` of them always on (ungated), and
    takes them out of the routed ones, so that routed experts are ``m E - K_s`` and routed active
    ``m k - K_s`` (paper, section 3.2). Both the active and the total expert parameters equal the
    original layer's (``k h`` and ``E h`` hidden units).

    Args:
        num_experts: E of the original layer.
        k: its experts per token, ``k <= E``.
        hidden: its expert width h; m must divide it.
        granularity: m >= 1 (m = 1, K_s = 0 is the original layer).
        shared_experts: K_s >= 0, ``K_s < m k`` so that at least one routed expert stays active.

    Raises:
        ValueError: naming the field, for a non-divisible width, k > E or too many shared experts.
    """
    owner = "fine_grained_config"
    require_int(owner, "num_experts", num_experts)
    require_int(owner, "k", k)
    require_int(owner, "hidden", hidden)
    require_int(owner, "granularity", granularity)
    require_int(owner, "shared_experts", shared_experts, low=0)
    if k > num_experts:
        raise ValueError(f"{owner}: k must be <= num_experts={num_experts}, got k={k}")
    if hidden % granularity:
        raise ValueError(
            f"{owner}: granularity must divide the expert width hidden={hidden}, got granularity={granularity}"
        )
    if shared_experts >= granularity * k:
        raise ValueError(
            f"{owner}: shared_experts must be < granularity * k = {granularity * k} (at least one routed "
            f"expert active), got shared_experts={shared_experts}"
        )
    return FineGrainedConfig(num_experts=granularity * num_experts - shared_experts,
                             k=granularity * k - shared_experts, hidden=hidden // granularity,
                             shared_experts=shared_experts)


def fine_grained_moe(dim: int, num_experts: int, k: int, hidden: int, granularity: int, shared_experts: int = 0,
                     *, router: Callable[[int, int, int], nn.Module] | None = None, **moe_kwargs) -> MoE:
    """A DeepSeekMoE layer built from the original layer's (E, k, h) and (m, K_s)
    (:func:`fine_grained_config`); ``forward(x: (..., dim)) -> (..., dim)``.

    Args:
        dim: model width.
        num_experts, k, hidden, granularity, shared_experts: see :func:`fine_grained_config`.
        router: ``router(dim, routed_experts, routed_k) -> router``; default
            ``TopKRouter(dim, routed_experts, routed_k)`` (softmax over the routed experts, top-k, as
            DeepSeekMoE).
        moe_kwargs: the other :class:`~moezoo.layers.moe.MoE` arguments (activation, gated, bias, ...);
            not ``shared_hidden`` or ``shared_gate``: DeepSeekMoE's shared experts are ungated and
            as wide as the routed ones.
    """
    for field in ("shared_hidden", "shared_gate", "shared_experts"):
        if field in moe_kwargs:
            raise ValueError(f"fine_grained_moe: {field} is set by the layout, got {field}={moe_kwargs[field]!r}")
    cfg = fine_grained_config(num_experts, k, hidden, granularity, shared_experts)
    make = router or (lambda d, e, kk: TopKRouter(d, e, k=kk))
    return MoE(dim, cfg.hidden, cfg.num_experts, make(dim, cfg.num_experts, cfg.k),
               shared_experts=cfg.shared_experts, shared_hidden=cfg.hidden, **moe_kwargs)
