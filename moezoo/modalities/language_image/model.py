"""LIMoE (Mustafa et al. 2022): one transformer tower for images and text, sparse MoE layers whose
router and experts both modalities share, trained with a contrastive loss."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moezoo.layers.mlp import MLP
from moezoo.layers.moe import RouterFactory
from moezoo.layers.multimodal_moe import MultimodalMoE
from moezoo.layers.placement import moe_block_indices
from moezoo.routers.batch_prioritized import bpr_router_factory

__all__ = ["LIMOE_LOSS_WEIGHTS", "LIMoE", "SharedBlock", "contrastive_loss"]

#: V-MoE's importance and load losses (over all tokens) plus LIMoE's local and global entropy losses
#: per modality. importance/load 0.005: V-MoE's (google-research/vmoe
#: ``vmoe/configs/vmoe_paper/common.py``, :data:`~moezoo.routers.batch_prioritized.VMOE_LOSS_WEIGHTS`),
#: which LIMoE builds on. The entropy-loss weights 0.01 and the text threshold log 2 (``LIMoE``'s
#: default ``entropy_thresholds``) are moezoo's, chosen for the tiny glyphs entry: LIMoE's own values
#: were not found. Searched: arXiv 2206.02770 (the stored copies gave only its abstract and
#: introduction), google-research/vmoe (its ``projects/contrastive`` is a two-tower LiT-style model
#: without LIMoE's entropy losses); LIMoE's training code is not public. Every config and card that
#: uses these says so.
LIMOE_LOSS_WEIGHTS = {
    "importance": 0.005,
    "load": 0.005,
    **{f"{m}/{name}": 0.01 for m in ("image", "text") for name in ("local_entropy", "global_entropy")},
}


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: image i and text i are a pair, every other text in the batch a negative.

    Args:
        image, text: (B, dim) L2-normalised embeddings.
        logit_scale: the temperature's inverse, ``exp`` of the learned log scale.
    """
    logits = logit_scale * image @ text.t()
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class SharedBlock(nn.Module):
    """A pre-LN transformer block applied to each modality's sequences; attention stays inside each
    sequence, the MLP (dense or :class:`MultimodalMoE`) sees the tokens of all modalities together."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp

    def forward(self, streams: dict[str, Tensor], masks: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        """streams: modality -> (B, N, dim); masks: modality -> (B, N) bool of real tokens, or None."""
        hidden = {}
        for m, x in streams.items():
            mask = masks.get(m)
            attn_mask = None if mask is None else mask[:, None, None, :]
            x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
            streams[m] = x
            hidden[m] = self.norm2(x)
        if isinstance(self.mlp, MultimodalMoE):
            # Route real tokens only: padding must not take expert places.
            flat = {m: h[masks[m]] if masks.get(m) is not None else h.reshape(-1, h.shape[-1]) for m, h in hidden.items()}
            routed = self.mlp(flat)
            for m, h in hidden.items():
                if masks.get(m) is not None:
                    out = h.new_zeros(h.shape)
                    out[masks[m]] = routed[m]
                else:
                    out = routed[m].view_as(h)
                streams[m] = streams[m] + out
        else:
            for m, h in hidden.items():
                streams[m] = streams[m] + self.mlp(h)
        return streams


class LIMoE(nn.Module):
    """``forward(images (B, C, H, W), text (B, L) ids, text_mask (B, L) bool)`` ->
    ``(image_emb (B, proj_dim), text_emb (B, proj_dim), logit_scale)``, embeddings L2-normalised.

    Modality-specific: patch embedding + position embedding (images), token + position embedding
    (text), and each modality's pooling (mean over its real tokens) and projection head. Shared:
    every block (attention, LayerNorms, MLPs, MoE routers and experts) and the final LayerNorm.

    Args:
        img_size, patch_size, in_chans: image input.
        vocab_size, max_text_len: text input.
        embed_dim, depth, num_heads, mlp_ratio: the tower.
        proj_dim: joint embedding size.
        moe_blocks: MoE placement (see :func:`moezoo.layers.placement.moe_block_indices`).
        num_experts, k, noise_std, capacity_factor, eval_capacity_factor, batch_priority, group_size:
            V-MoE's BPR router settings (LIMoE: k=1, BPR), applied per modality.
        router: a router factory replacing the default.
        entropy_thresholds: global-entropy threshold tau per modality (nats).
        aux_loss_weights: coefficients (default :data:`LIMOE_LOSS_WEIGHTS`).
        init_logit_scale: initial log inverse temperature (CLIP: log(1/0.07); LiT: log 10).
        backend: expert-computation backend.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 1,
        vocab_size: int = 128,
        max_text_len: int = 16,
        embed_dim: int = 96,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        proj_dim: int = 64,
        *,
        moe_blocks: str | list[int] = "every_2",
        num_experts: int = 8,
        k: int = 1,
        noise_std: float = 1.0,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = True,
        group_size: int | None = None,
        router: RouterFactory | None = None,
        entropy_thresholds: dict[str, float] | None = None,
        aux_loss_weights: dict[str, float] | None = None,
        init_logit_scale: float = math.log(10.0),
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if vocab_size < 3 or max_text_len < 1:
            raise ValueError(f"vocab_size must be >= 3 and max_text_len >= 1, got {vocab_size}, {max_text_len}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.image_pos = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.text_pos = nn.Parameter(torch.zeros(1, max_text_len, embed_dim))
        self.moe_indices = moe_block_indices(depth, moe_blocks)
        hidden = int(embed_dim * mlp_ratio)
        if router is None:
            router = bpr_router_factory(k, noise_std=noise_std, capacity_factor=capacity_factor,
                                        eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                                        group_size=group_size)
        weights = LIMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights
        thresholds = {"text": math.log(2.0)} if entropy_thresholds is None else entropy_thresholds
        self.blocks = nn.ModuleList(
            SharedBlock(embed_dim, num_heads,
                        MultimodalMoE(embed_dim, hidden, num_experts, router, entropy_thresholds=thresholds,
                                      backend=backend, aux_loss_weights=weights)
                        if i in self.moe_indices else MLP(embed_dim, hidden))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.image_head = nn.Linear(embed_dim, proj_dim, bias=False)
        self.text_head = nn.Linear(embed_dim, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)

    def encode(self, images: Tensor | None = None, text: Tensor | None = None,
               text_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Embeddings of whichever modalities are given: ``{"image": (B, proj), "text": (B, proj)}``."""
        streams: dict[str, Tensor] = {}
        masks: dict[str, Tensor | None] = {}
        if images is not None:
            streams["image"] = self.patch_embed(images) + self.image_pos
            masks["image"] = None
        if text is not None:
            if text.dim() != 2 or text.shape[1] > self.text_pos.shape[1]:
                raise ValueError(f"text must be (batch, <= {self.text_pos.shape[1]}) token ids, got {tuple(text.shape)}")
            mask = torch.ones_like(text, dtype=torch.bool) if text_mask is None else text_mask.bool()
            streams["text"] = self.token_embed(text) + self.text_pos[:, : text.shape[1]]
            masks["text"] = mask
        if not streams:
            raise ValueError("LIMoE.encode needs images, text or both")
        for block in self.blocks:
            streams = block(streams, masks)
        out = {}
        for m, x in streams.items():
            x = self.norm(x)
            if masks[m] is None:
                pooled = x.mean(dim=1)
            else:
                weights = masks[m].unsqueeze(-1).to(x.dtype)
                pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            head = self.image_head if m == "image" else self.text_head
            out[m] = F.normalize(head(pooled), dim=-1)
        return out

    def forward(self, images: Tensor, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        embeddings = self.encode(images, text, text_mask)
        return embeddings["image"], embeddings["text"], self.logit_scale.clamp(max=math.log(100.0)).exp()
