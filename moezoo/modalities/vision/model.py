"""V-MoE (Riquelme et al. 2021): a timm ViT whose chosen MLPs are sparse MoE layers with BPR."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.routed import routed_layers
from moezoo.layers.soft_moe import SoftMoE
from moezoo.routers.batch_prioritized import BatchPrioritizedRouter

__all__ = [
    "SoftMoEVisionTransformer",
    "VMOE_LOSS_WEIGHTS",
    "VisionTransformerMoE",
    "bpr_router_factory",
    "moe_block_indices",
    "set_routing",
]

#: V-MoE's coefficients (configs/vmoe_paper: importance and load 0.005 each = 0.01 x their mean).
VMOE_LOSS_WEIGHTS = {"importance": 0.005, "load": 0.005}


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


class VisionTransformerMoE(VisionTransformer):
    """timm ``VisionTransformer`` with V-MoE layers: ``forward(images: (B, C, H, W)) -> (B, classes)``.

    The MLP of each chosen block is replaced by :class:`moezoo.layers.MoE` whose experts are the
    ViT MLP (Dense-GELU-Dense with biases) and whose router sees the block's second LayerNorm output,
    as in the reference. Defaults are the paper's: E=32, k=2, noise std 1/E, C=1.05, BPR, groups of
    8 images, capacity rounded up to a multiple of 4, identically initialised experts.

    Args (beyond timm's ViT): 
        moe_blocks: placement, see :func:`moe_block_indices` ("every_2", "last_2", ...).
        num_experts, k, noise_std, capacity_factor, eval_capacity_factor, batch_priority,
            capacity_multiple_of: the :class:`~moezoo.routers.BatchPrioritizedRouter` settings.
        group_images: images per routing group (group size = images x tokens per image).
        identical_init: all experts start as the same MLP (V-MoE); else independently.
        expert_dropout: dropout inside the experts.
        router: a router factory ``(dim, num_experts) -> router`` replacing the BPR router.
        aux_loss_weights: coefficients of the router losses (default: V-MoE's 0.005 / 0.005).
        backend: expert-computation backend.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        *,
        moe_blocks: str | list[int] = "every_2",
        num_experts: int = 32,
        k: int = 2,
        noise_std: float = 1.0,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = True,
        group_images: int = 8,
        capacity_multiple_of: int | None = 4,
        identical_init: bool = True,
        expert_dropout: float = 0.0,
        router: RouterFactory | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=class_token,
            global_pool=global_pool,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        if group_images < 1:
            raise ValueError(f"group_images must be >= 1, got {group_images}")
        self.tokens_per_image = self.patch_embed.num_patches + self.num_prefix_tokens
        self.moe_indices = moe_block_indices(depth, moe_blocks)
        hidden = int(embed_dim * mlp_ratio)
        if router is None:
            router = bpr_router_factory(
                k,
                noise_std=noise_std,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                batch_priority=batch_priority,
                group_size=group_images * self.tokens_per_image,
                capacity_multiple_of=capacity_multiple_of,
            )
        weights = VMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights
        for i in self.moe_indices:
            moe = MoE(
                embed_dim,
                hidden,
                num_experts,
                router,
                activation="gelu",
                bias=True,
                dropout=expert_dropout,
                identical_init=identical_init,
                backend=backend,
                aux_loss_weights=weights,
            )
            _init_vmoe(moe, identical_init)
            self.blocks[i].mlp = moe

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]


def bpr_router_factory(k: int = 2, **kwargs) -> RouterFactory:
    """A factory ``(dim, num_experts) -> BatchPrioritizedRouter(dim, num_experts, k, **kwargs)``."""

    def build(dim: int, num_experts: int) -> BatchPrioritizedRouter:
        return BatchPrioritizedRouter(dim, num_experts, k, **kwargs)

    return build


def set_routing(model: nn.Module, *, eval_capacity_factor: float | None = None,
                batch_priority: bool | None = None) -> None:
    """Change every router's evaluation capacity factor and/or BPR flag (V-MoE's inference knob)."""
    for _, layer in routed_layers(model):
        router = getattr(layer, "router", None)
        if eval_capacity_factor is not None and hasattr(router, "eval_capacity_factor"):
            router.eval_capacity_factor = float(eval_capacity_factor)
        if batch_priority is not None and hasattr(router, "batch_priority"):
            router.batch_priority = bool(batch_priority)


class SoftMoEVisionTransformer(VisionTransformer):
    """Soft MoE ViT (Puigcerver et al. 2023): ``forward(images) -> (B, classes)``.

    The reference backbone: no class token, global average pooling, QK-normalised attention; the
    MLPs of the last ``moe_blocks`` blocks (default: the last half) become :class:`SoftMoE` layers,
    routed per image.

    Args (beyond timm's ViT):
        moe_blocks: placement (see :func:`moe_block_indices`); None = the last half of the blocks.
        num_experts: E (paper: 128 for S/16, B/16, L/16).
        slots_per_expert: p (paper default 1).
        expert_dropout: dropout inside the experts.
        backend: expert-computation backend.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        *,
        moe_blocks: str | list[int] | None = None,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        expert_dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            class_token=False,
            global_pool="avg",
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.moe_indices = moe_block_indices(depth, moe_blocks or f"final_{max(depth // 2, 1)}")
        hidden = int(embed_dim * mlp_ratio)
        for i in self.moe_indices:
            self.blocks[i].mlp = SoftMoE(
                embed_dim, hidden, num_experts, slots_per_expert, activation="gelu", dropout=expert_dropout,
                backend=backend,
            )

    def moe_layers(self) -> list[SoftMoE]:
        """The Soft MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]


@torch.no_grad()
def _init_vmoe(moe: MoE, identical: bool) -> None:
    """V-MoE's initialisation: xavier-uniform expert kernels, N(0, 1e-6) biases, lecun-normal router."""
    experts = moe.experts
    for w in (experts.w_in, experts.w_out):
        fan_in, fan_out = w.shape[1], w.shape[2]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.uniform_(-bound, bound)
    for b in (experts.b_in, experts.b_out):
        b.normal_(0.0, 1e-6)
    if identical:
        experts.copy_expert_to_all(0)
    gate = getattr(moe.router, "gate", None)
    if isinstance(gate, nn.Linear):
        # flax lecun_normal: truncated normal at 2 std, std corrected for the truncation.
        std = 1.0 / math.sqrt(gate.in_features) / 0.87962566103423978
        nn.init.trunc_normal_(gate.weight, std=std, a=-2 * std, b=2 * std)
