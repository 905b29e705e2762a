"""V-MoE (Riquelme et al. 2021): a timm ViT whose chosen MLPs are sparse MoE layers with BPR."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.placement import moe_block_indices
from moezoo.layers.soft_moe import SoftMoE
from moezoo.routers.batch_prioritized import VMOE_LOSS_WEIGHTS, bpr_router_factory

__all__ = ["SoftMoEVisionTransformer", "VisionTransformerMoE"]

class VisionTransformerMoE(VisionTransformer):
    """timm ``VisionTransformer`` with V-MoE layers: ``forward(images: (B, C, H, W)) -> (B, classes)``.

    The MLP of each chosen block is replaced by :class:`moezoo.layers.MoE` whose experts are the
    ViT MLP (Dense-GELU-Dense with biases) and whose router sees the block's second LayerNorm output,
    as in the reference. Defaults are the paper's: E=32, k=2, noise std 1/E, C=1.05, BPR, groups of
    8 images, capacity rounded up to a multiple of 4, identically initialised experts.

    Args (beyond timm's ViT):
        moe_blocks: placement, see :func:`~moezoo.layers.placement.moe_block_indices` ("every_2", "last_2", ...).
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


class SoftMoEVisionTransformer(VisionTransformer):
    """Soft MoE ViT (Puigcerver et al. 2023): ``forward(images) -> (B, classes)``.

    The reference backbone: no class token, global average pooling, QK-normalised attention; the
    MLPs of the last ``moe_blocks`` blocks (default: the last half) become :class:`SoftMoE` layers,
    routed per image.

    Args (beyond timm's ViT):
        moe_blocks: placement (see :func:`~moezoo.layers.placement.moe_block_indices`); None = the last half of the blocks.
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
