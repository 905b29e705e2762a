"""V-MoE (Riquelme et al. 2021): a timm ViT whose chosen MLPs are sparse MoE layers with BPR."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import Tensor, nn

from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.placement import moe_block_indices
from moezoo.layers.soft_moe import SoftMoE
from moezoo.routers.batch_prioritized import VMOE_LOSS_WEIGHTS, bpr_router_factory

__all__ = ["ACTIVATIONS", "SoftMoEVisionTransformer", "VisionTransformerMoE"]

#: MLP and expert activations, by their moezoo kernel names (timm knows the same names).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


class _ClassifierViT(VisionTransformer):
    """timm's ViT with the options the reference (google-research/vmoe) needs.

    ``activation`` selects timm's MLP activation by name, and ``representation_size`` adds vmoe's
    representation layer: ``pre_logits`` = Linear(width -> R) + tanh between pooling and head,
    so ``forward_head(x, pre_logits=True)`` returns the tanh features.
    """

    def __init__(self, *, activation: str, representation_size: int | None, **timm_kwargs) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if representation_size is not None and (
            isinstance(representation_size, bool) or not isinstance(representation_size, int) or representation_size < 1
        ):
            raise ValueError(f"representation_size must be None or an int >= 1, got {representation_size!r}")
        super().__init__(act_layer=activation, **timm_kwargs)
        self.activation = activation
        self.representation_size = representation_size
        self.pre_logits = nn.Identity()
        if representation_size is not None:
            self.pre_logits = nn.Sequential(
                OrderedDict(fc=nn.Linear(self.embed_dim, representation_size), act=nn.Tanh())
            )
            self.reset_classifier(self.num_classes)
            init_weights_vit_timm(self.pre_logits.fc)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: (B, tokens, width) -> (B, classes), or the (B, R or width) features with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if getattr(self, "representation_size", None) is not None and num_classes > 0:
            self.head = nn.Linear(self.representation_size, num_classes)
            init_weights_vit_timm(self.head)
            self.head.train(self.training)


class VisionTransformerMoE(_ClassifierViT):
    """timm ``VisionTransformer`` with V-MoE layers: ``forward(images: (B, C, H, W)) -> (B, classes)``.

    The MLP of each chosen block is replaced by :class:`moezoo.layers.MoE` whose experts are the
    ViT MLP (Dense-act-Dense with biases) and whose router sees the block's second LayerNorm output,
    as in the reference. Defaults are the paper's: E=32, k=2, noise std 1/E, C=1.05, BPR, groups of
    8 images, capacity rounded up to a multiple of 4, identically initialised experts.

    With ``ensemble_size`` M > 1 it is E^3 (efficient ensembles of experts, Allingham et al. 2021;
    vmoe's ``VisionTransformerMoeEnsemble``): before the first MoE block every image's tokens are
    repeated M times (``repeat_interleave``), member m routes only to experts
    ``[m E/M, (m+1) E/M)`` (:class:`~moezoo.routers.BatchPrioritizedRouter` ``ensemble_size``),
    the members share everything else, and ``forward`` returns the ensemble's log-probabilities
    ``log(mean_m softmax(member logits))`` (vmoe's ensemble evaluation); :meth:`forward_members`
    returns the (B * M, classes) member logits.

    Args (beyond timm's ViT):
        fc_norm: timm's final-norm placement; None: after pooling for ``global_pool="avg"``,
            False: on every token before pooling (vmoe's ``encoder_norm``).
        activation: MLP and expert activation, one of :data:`ACTIVATIONS`; "gelu" is timm's exact
            GELU, "gelu_tanh" the tanh approximation of vmoe's (flax's) ``gelu``.
        representation_size: vmoe's ``pre_logits`` layer width (Linear + tanh before the head).
        moe_blocks: placement, see :func:`~moezoo.layers.placement.moe_block_indices` ("every_2", "last_2", ...).
        num_experts, k, noise_std, capacity_factor, eval_capacity_factor, batch_priority,
            capacity_multiple_of: the :class:`~moezoo.routers.BatchPrioritizedRouter` settings.
        group_images: images per routing group (default 8): groups of images x tokens per image
            (x M with E^3) tokens.
        group_size: routing groups counted in tokens instead (vmoe's ``group_size``, any size;
            with E^3 it counts the members' copies); give it or ``group_images``, not both.
        ensemble_size: M, the E^3 members (1: V-MoE).
        bfloat16_dispatch: expert inputs and outputs rounded to bfloat16, routing and the combine
            in float32 (vmoe's ``dispatcher.bfloat16``, on in its released configs).
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
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        *,
        activation: str = "gelu",
        representation_size: int | None = None,
        moe_blocks: str | list[int] = "every_2",
        num_experts: int = 32,
        k: int = 2,
        noise_std: float = 1.0,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = True,
        group_images: int | None = None,
        group_size: int | None = None,
        capacity_multiple_of: int | None = 4,
        ensemble_size: int = 1,
        bfloat16_dispatch: bool = False,
        identical_init: bool = True,
        expert_dropout: float = 0.0,
        router: RouterFactory | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            activation=activation,
            representation_size=representation_size,
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
            fc_norm=fc_norm,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        for name, value in (("group_images", group_images), ("group_size", group_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if group_images is not None and group_size is not None:
            raise ValueError(f"give group_images or group_size, not both (got {group_images} and {group_size})")
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be an int >= 1, got {ensemble_size!r}")
        self.ensemble_size = ensemble_size
        self.tokens_per_image = self.patch_embed.num_patches + self.num_prefix_tokens
        self.moe_indices = moe_block_indices(depth, moe_blocks)
        if ensemble_size > 1 and not self.moe_indices:
            raise ValueError(f"ensemble_size={ensemble_size} needs at least one MoE block, got moe_blocks={moe_blocks!r}")
        if group_size is None:
            group_size = (group_images or 8) * self.tokens_per_image * ensemble_size
        hidden = int(embed_dim * mlp_ratio)
        if router is None:
            router = bpr_router_factory(
                k,
                noise_std=noise_std,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                batch_priority=batch_priority,
                group_size=group_size,
                capacity_multiple_of=capacity_multiple_of,
                ensemble_size=ensemble_size,
            )
        weights = VMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights
        layer = MoE if ensemble_size == 1 else partial(_MemberInterleavedMoE, ensemble_size=ensemble_size)
        for i in self.moe_indices:
            moe = layer(
                embed_dim,
                hidden,
                num_experts,
                router,
                activation=activation,
                bias=True,
                dropout=expert_dropout,
                identical_init=identical_init,
                backend=backend,
                bfloat16_dispatch=bfloat16_dispatch,
                aux_loss_weights=weights,
            )
            _init_vmoe(moe, identical_init)
            self.blocks[i].mlp = moe

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, C, H, W) -> (B * M, tokens, width) normalised tokens (M = ``ensemble_size``)."""
        if self.ensemble_size == 1:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("an E^3 model (ensemble_size > 1) takes no attention mask")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, block in enumerate(self.blocks):
            if i == self.moe_indices[0]:
                x = x.repeat_interleave(self.ensemble_size, dim=0)
            x = block(x)
        return self.norm(x)

    def forward_members(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B * M, classes): each member's logits, image-major (image b, member
        m at row b * M + m), as vmoe's ``VisionTransformerMoeEnsemble`` returns them."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, C, H, W) -> (B, classes): logits, or with E^3 the ensemble's log-probabilities."""
        if self.ensemble_size == 1:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("an E^3 model (ensemble_size > 1) takes no attention mask")
        members = self.forward_members(x)
        log_probs = torch.log_softmax(members.float(), dim=-1).view(-1, self.ensemble_size, members.shape[-1])
        return (torch.logsumexp(log_probs, dim=1) - math.log(self.ensemble_size)).to(members.dtype)


class _MemberInterleavedMoE(MoE):
    """E^3's MoE layer: ``forward(x: (B * M, tokens, dim)) -> same shape``, with rows image-major.

    The router sees the tokens in vmoe's order (image, token, member), so token i of a routing
    group belongs to member ``i % M`` as :class:`~moezoo.routers.BatchPrioritizedRouter` expects,
    and position order (vanilla routing, BPR ties) is the reference's.
    """

    def __init__(self, *args, ensemble_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ensemble_size = ensemble_size

    def forward(self, x: Tensor) -> Tensor:
        rows, tokens, dim = x.shape
        interleaved = x.view(rows // self.ensemble_size, self.ensemble_size, tokens, dim).transpose(1, 2)
        return super().forward(interleaved).transpose(1, 2).reshape(rows, tokens, dim)


class SoftMoEVisionTransformer(_ClassifierViT):
    """Soft MoE ViT (Puigcerver et al. 2023): ``forward(images) -> (B, classes)``.

    The reference backbone (vmoe's ``projects/soft_moe``): no class token, QK-normalised attention,
    the final LayerNorm on every token, then global average pooling and the head; the MLPs of the
    last ``moe_blocks`` blocks (default: the last half) become :class:`SoftMoE` layers, routed per
    image.

    Args (beyond timm's ViT):
        fc_norm: False (default, the reference): LayerNorm on every token, then pool; True: timm's
            average-pool head (pool, then LayerNorm).
        activation, representation_size: as :class:`VisionTransformerMoE`.
        moe_blocks: placement (see :func:`~moezoo.layers.placement.moe_block_indices`); None = the last half of the blocks.
        num_experts: E (paper: 128 for S/16, B/16, L/16).
        slots_per_expert: p (paper default 1).
        expert_dropout: dropout inside the experts.
        bfloat16_dispatch: expert inputs and outputs rounded to bfloat16 (vmoe's ``SoftRouter``
            always does).
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
        fc_norm: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        *,
        activation: str = "gelu",
        representation_size: int | None = None,
        moe_blocks: str | list[int] | None = None,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        expert_dropout: float = 0.0,
        bfloat16_dispatch: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            activation=activation,
            representation_size=representation_size,
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
            fc_norm=bool(fc_norm),
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.moe_indices = moe_block_indices(depth, moe_blocks or f"final_{max(depth // 2, 1)}")
        hidden = int(embed_dim * mlp_ratio)
        for i in self.moe_indices:
            self.blocks[i].mlp = SoftMoE(
                embed_dim, hidden, num_experts, slots_per_expert, activation=activation, dropout=expert_dropout,
                backend=backend, bfloat16_dispatch=bfloat16_dispatch,
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
