"""Sparse upcycling (Komatsuzaki et al. 2022): a dense timm ViT becomes a V-MoE, experts = its MLPs."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn

from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.placement import moe_block_indices
from moezoo.routers.batch_prioritized import VMOE_LOSS_WEIGHTS, bpr_router_factory

__all__ = ["upcycle_vit"]


def upcycle_vit(
    model: nn.Module,
    *,
    moe_blocks: str | Sequence[int] = "every_2",
    num_experts: int = 8,
    k: int = 2,
    capacity_factor: float = 2.0,
    eval_capacity_factor: float | None = None,
    batch_priority: bool = True,
    group_images: int = 8,
    router: RouterFactory | None = None,
    aux_loss_weights: Mapping[str, float] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Return a copy of a timm ``VisionTransformer`` whose chosen MLPs are MoE layers with every
    expert a copy of that MLP (the dense checkpoint is left untouched).

    The default router is V-MoE's Batch Prioritized Router with its top-k weights renormalised to
    sum to 1, so at initialisation, whenever no token is dropped, the upcycled model computes exactly
    what the dense one does (each token gets a convex combination of identical experts).

    Args:
        model: a timm ViT (``blocks[i].mlp`` with ``fc1``, ``act``, ``fc2``).
        moe_blocks: which blocks (see :func:`moezoo.layers.placement.moe_block_indices`).
        num_experts, k, capacity_factor, eval_capacity_factor, batch_priority, group_images: the
            default router's settings (group size = images x tokens per image).
        router: a router factory replacing the default.
        aux_loss_weights: router loss coefficients (default V-MoE's).
        backend: expert-computation backend.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"upcycle_vit needs a timm VisionTransformer (with .blocks), got {type(model).__name__}")
    upcycled = copy.deepcopy(model)
    indices = moe_block_indices(len(blocks), moe_blocks)
    if router is None:
        tokens = upcycled.patch_embed.num_patches + upcycled.num_prefix_tokens
        router = bpr_router_factory(
            k, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
            batch_priority=batch_priority, group_size=group_images * tokens, normalize=True,
        )
    for i in indices:
        mlp = upcycled.blocks[i].mlp
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise ValueError(f"upcycle_vit: block {i}'s MLP has no fc1/fc2 Linear layers ({type(mlp).__name__})")
        if not isinstance(getattr(mlp, "act", None), nn.GELU) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"upcycle_vit: block {i}'s MLP is not Linear-GELU-Linear; cannot copy it into experts")
        approximate = mlp.act.approximate
        moe = MoE(
            fc1.in_features, fc1.out_features, num_experts, router,
            activation="gelu_tanh" if approximate == "tanh" else "gelu",
            bias=fc1.bias is not None, dropout=getattr(mlp.drop1, "p", 0.0), backend=backend,
            aux_loss_weights=VMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights,
        ).to(fc1.weight.device, fc1.weight.dtype)
        moe.experts.load_dense(fc1, fc2)
        upcycled.blocks[i].mlp = moe
    upcycled.moe_indices = indices
    return upcycled
