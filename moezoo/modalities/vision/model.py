"""V-MoE (Riquelme et al. 2021): a timm ViT whose chosen MLPs are sparse MoE layers with BPR."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
from timm.layers import register_notrace_module
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.fine_grained import fine_grained_config
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.placement import moe_block_indices
from moezoo.layers.soft_moe import SoftMoE
from moezoo.routers.batch_prioritized import VMOE_LOSS_WEIGHTS, bpr_router_factory

__all__ = ["ACTIVATIONS", "SoftMoEVisionTransformer", "VisionMoE", "VisionTransformerMoE"]

#: MLP and expert activations, by their moezoo kernel names (timm knows the same names).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


class _ClassifierViT(VisionTransformer):
    """timm's ViT with the options the reference (google-research/vmoe) needs.

    ``activation`` selects timm's MLP activation by name, and ``representation_size`` adds vmoe's
    representation layer: ``pre_logits`` = Linear(width -> R) + tanh between pooling and head,
    so ``forward_head(x, pre_logits=True)`` returns the tanh features.
    """

    def __init__(self, *, activation: str = "gelu", representation_size: int | None = None, **timm_kwargs) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if "act_layer" in timm_kwargs:
            raise ValueError(f"give the activation as activation= (one of {ACTIVATIONS}), not act_layer="
                             f"{timm_kwargs['act_layer']!r}: the experts use the same one")
        if representation_size is not None:
            require_int(type(self).__name__, "representation_size", representation_size)
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

    Every keyword argument of timm's ``VisionTransformer`` is accepted with timm's default
    (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ..., ``dynamic_img_size``,
    ``reg_tokens``, ``init_values``, ``qk_norm``, ``drop_path_rate``; ``fc_norm``: None puts the
    final norm after pooling for ``global_pool="avg"``, False on every token before pooling, as
    vmoe's ``encoder_norm``), except ``act_layer``: the activation is ``activation``. Each MoE
    layer's experts are as wide as the block's MLP.

    Args (beyond timm's ViT):
        activation: MLP and expert activation, one of :data:`ACTIVATIONS`; "gelu" is timm's exact
            GELU, "gelu_tanh" the tanh approximation of vmoe's (flax's) ``gelu``.
        representation_size: vmoe's ``pre_logits`` layer width (Linear + tanh before the head).
        moe_blocks: placement, see :func:`~moezoo.layers.placement.moe_block_indices` ("every_2", "last_2", ...).
        num_experts, k, noise_std, capacity_factor, eval_capacity_factor, batch_priority,
            capacity_multiple_of: the :class:`~moezoo.routers.BatchPrioritizedRouter` settings.
        group_images: images per routing group (default 8): groups of images x tokens per image
            (x M with E^3) tokens, following the input size (see :class:`VisionMoE`).
        group_size: routing groups counted in tokens instead (vmoe's ``group_size``, any size;
            with E^3 it counts the members' copies); give it or ``group_images``, not both.
        ensemble_size: M, the E^3 members (1: V-MoE).
        bfloat16_dispatch: expert inputs and outputs rounded to bfloat16, routing and the combine
            in float32 (vmoe's ``dispatcher.bfloat16``, on in its released configs).
        identical_init: all experts start as the same MLP (V-MoE); else independently.
        expert_dropout: dropout inside the experts.
        granularity, shared_experts: DeepSeekMoE's m and K_s
            (:func:`~moezoo.layers.fine_grained.fine_grained_config`): ``m E - K_s`` routed experts of
            width ``hidden / m``, ``m k - K_s`` per token, plus K_s ungated shared experts; the
            active expert parameters stay those of (E, k). Defaults: the plain V-MoE layer.
        router: a router factory ``(dim, num_experts) -> router`` replacing the BPR router.
        aux_loss_weights: coefficients of the router losses (default: V-MoE's 0.005 / 0.005).
        backend: expert-computation backend.
    """

    def __init__(
        self,
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
        granularity: int = 1,
        shared_experts: int = 0,
        router: RouterFactory | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
        **timm_kwargs,
    ) -> None:
        super().__init__(activation=activation, representation_size=representation_size, **timm_kwargs)
        owner = type(self).__name__
        for name, value in (("group_images", group_images), ("group_size", group_size)):
            if value is not None:
                require_int(owner, name, value)
        if group_images is not None and group_size is not None:
            raise ValueError(f"give group_images or group_size, not both (got {group_images} and {group_size})")
        require_int(owner, "ensemble_size", ensemble_size)
        self.ensemble_size = ensemble_size
        self.moe_indices = moe_block_indices(len(self.blocks), moe_blocks)
        if ensemble_size > 1 and not self.moe_indices:
            raise ValueError(f"ensemble_size={ensemble_size} needs at least one MoE block, got moe_blocks={moe_blocks!r}")
        # Groups counted in images follow the input size (set_input_size, dynamic_img_size): the
        # layers recompute their router's group size in tokens from every input.
        if router is None and group_size is None:
            group_images = group_images or 8
            group_size = group_images * self.tokens_per_image * ensemble_size
        else:
            group_images = None
        hidden = self.blocks[0].mlp.fc1.out_features
        fine = fine_grained_config(num_experts, k, hidden, granularity, shared_experts)
        if router is None:
            router = bpr_router_factory(
                fine.k, noise_std=noise_std, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                batch_priority=batch_priority, group_size=group_size, capacity_multiple_of=capacity_multiple_of,
                ensemble_size=ensemble_size,
            )
        weights = VMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights
        for i in self.moe_indices:
            moe = VisionMoE(
                self.embed_dim, fine.hidden, fine.num_experts, router, shared_experts=fine.shared_experts,
                shared_hidden=fine.hidden, group_images=group_images, ensemble_size=ensemble_size,
                activation=activation, bias=True, dropout=expert_dropout, identical_init=identical_init,
                backend=backend, bfloat16_dispatch=bfloat16_dispatch, aux_loss_weights=weights,
            )
            _init_vmoe(moe, identical_init)
            self.blocks[i].mlp = moe

    @property
    def tokens_per_image(self) -> int:
        """Tokens of one image at the model's input size (patches + prefix tokens)."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def moe_layers(self) -> list[VisionMoE]:
        """The MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, C, H, W) -> (B * M, tokens, width) normalised tokens (M = ``ensemble_size``)."""
        if self.ensemble_size == 1:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        _refuse_mask(attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, block in enumerate(self.blocks):
            if i == self.moe_indices[0]:
                x = x.repeat_interleave(self.ensemble_size, dim=0)
            x = block(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` (and ``features_only``); not for E^3, whose blocks after the
        first MoE block see M copies of every image."""
        if self.ensemble_size > 1:
            raise NotImplementedError(
                f"forward_intermediates is not available for an E^3 model (ensemble_size={self.ensemble_size}): "
                "use forward_features, which returns every member's tokens"
            )
        return super().forward_intermediates(x, *args, **kwargs)

    def forward_members(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B * M, classes): each member's logits, image-major (image b, member
        m at row b * M + m), as vmoe's ``VisionTransformerMoeEnsemble`` returns them."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, C, H, W) -> (B, classes): logits, or with E^3 the ensemble's log-probabilities."""
        if self.ensemble_size == 1:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        _refuse_mask(attn_mask, is_causal)
        members = self.forward_members(x)
        log_probs = torch.log_softmax(members.float(), dim=-1).view(-1, self.ensemble_size, members.shape[-1])
        return (torch.logsumexp(log_probs, dim=1) - math.log(self.ensemble_size)).to(members.dtype)


def _refuse_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    # torch.fx traces with a placeholder for every argument: only a real mask or True is refused.
    if isinstance(attn_mask, Tensor) or is_causal is True:
        raise ValueError("an E^3 model (ensemble_size > 1) takes no attention mask")


class VisionMoE(MoE):
    """V-MoE's MoE layer in a ViT block: ``forward(x: (B * M, tokens, dim)) -> same shape``.

    With ``group_images`` set, the router's groups are that many images of the input at hand:
    its ``group_size`` becomes ``group_images * tokens * M`` at every forward, so that a group never
    straddles images whatever the input size (``set_input_size``, ``dynamic_img_size``).

    With ``ensemble_size`` M > 1 (E^3) the rows are image-major copies of each image, one per
    member; the router sees the tokens in vmoe's order (image, token, member), so token i of a
    routing group belongs to member ``i % M`` as :class:`~moezoo.routers.BatchPrioritizedRouter`
    expects, and position order (vanilla routing, BPR ties) is the reference's.
    """

    def __init__(self, *args, group_images: int | None = None, ensemble_size: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_images = group_images
        self.ensemble_size = ensemble_size

    def forward(self, x: Tensor) -> Tensor:
        """x: (B * M, tokens, dim) -> same shape."""
        rows, tokens, dim = x.shape
        if self.group_images is not None:
            self.router.group_size = self.group_images * tokens * self.ensemble_size
        if self.ensemble_size == 1:
            return super().forward(x)
        interleaved = x.view(rows // self.ensemble_size, self.ensemble_size, tokens, dim).transpose(1, 2)
        return super().forward(interleaved).transpose(1, 2).reshape(rows, tokens, dim)


class SoftMoEVisionTransformer(_ClassifierViT):
    """Soft MoE ViT (Puigcerver et al. 2023): ``forward(images) -> (B, classes)``.

    The reference backbone (vmoe's ``projects/soft_moe``): no class token, QK-normalised attention,
    the final LayerNorm on every token, then global average pooling and the head; the MLPs of the
    last ``moe_blocks`` blocks (default: the last half) become :class:`SoftMoE` layers, routed per
    image.

    Every keyword argument of timm's ``VisionTransformer`` is accepted, as for
    :class:`VisionTransformerMoE`; ``class_token`` is False and ``global_pool`` "avg" (anything
    else raises), and the defaults of ``qk_norm`` and ``fc_norm`` are the reference's.

    Args (beyond timm's ViT):
        qk_norm: QK-normalised attention (default True, the reference).
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
        class_token, global_pool: must stay False and "avg" (timm's arguments, fixed by Soft MoE).
    """

    def __init__(
        self,
        *,
        qk_norm: bool = True,
        fc_norm: bool = False,
        activation: str = "gelu",
        representation_size: int | None = None,
        moe_blocks: str | list[int] | None = None,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        expert_dropout: float = 0.0,
        bfloat16_dispatch: bool = False,
        backend: str = "auto",
        class_token: bool = False,
        global_pool: str = "avg",
        **timm_kwargs,
    ) -> None:
        # Named here, not left to **timm_kwargs, so that a printed config (jsonargparse reads the
        # signature) carries these values and not timm's defaults, which this model refuses.
        for name, value, fixed in (("class_token", class_token, False), ("global_pool", global_pool, "avg")):
            if value != fixed:
                raise ValueError(f"SoftMoEVisionTransformer: {name} must be {fixed!r} (Soft MoE mixes all tokens of an "
                                 f"image and pools them), got {value!r}")
        timm_kwargs.update(class_token=False, global_pool="avg")
        super().__init__(activation=activation, representation_size=representation_size, qk_norm=qk_norm,
                         fc_norm=bool(fc_norm), **timm_kwargs)
        depth = len(self.blocks)
        self.moe_indices = moe_block_indices(depth, moe_blocks or f"final_{max(depth // 2, 1)}")
        for i in self.moe_indices:
            self.blocks[i].mlp = SoftMoE(
                self.embed_dim, self.blocks[i].mlp.fc1.out_features, num_experts, slots_per_expert, activation=activation, dropout=expert_dropout,
                backend=backend, bfloat16_dispatch=bfloat16_dispatch,
            )

    def moe_layers(self) -> list[SoftMoE]:
        """The Soft MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]


# torch.fx cannot trace routing (data-dependent shapes): timm's FX feature extraction
# (features_only with feature_cls="fx", timm's FX tests) keeps the routed layers as leaf modules.
for _layer in (MoE, VisionMoE, SoftMoE):
    register_notrace_module(_layer)


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
