"""Tiny models of every family, with their inputs and a scalar objective, for the multi-process tests.

Each family is ``build(capacity) -> model`` and ``objective(model, rank) -> scalar``; the objective
of a rank's own batch (inputs drawn from a generator seeded by the rank) plus the model's weighted
auxiliary losses, so that router gradients are part of what is compared. ``capacity`` turns token
dropping on where the family's router has a capacity (V-MoE, LIMoE, Time-MoE, converted Mixtral) and
is ignored elsewhere (Soft MoE, SpeechMoE, σ-MoE and DeepSeek-V3's sigmoid router route without one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moezoo.layers import aux_loss


def _gen(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + rank)


def vmoe(capacity: bool) -> nn.Module:
    from moezoo.modalities.vision import VisionTransformerMoE

    return VisionTransformerMoE(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=12, depth=2,
                                num_heads=2, moe_blocks="every_2", num_experts=4, k=2, group_images=2,
                                capacity_factor=0.5 if capacity else 4.0, backend="torch")


def soft_moe(capacity: bool) -> nn.Module:
    from moezoo.modalities.vision import SoftMoEVisionTransformer

    return SoftMoEVisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=12, depth=2,
                                    num_heads=2, num_experts=4, slots_per_expert=2, backend="torch")


def image_objective(model: nn.Module, rank: int) -> Tensor:
    images = torch.randn(4, 1, 8, 8, generator=_gen(rank))
    weights = torch.randn(4, 5, generator=_gen(rank + 50))
    return (model(images) * weights).sum() + aux_loss(model)


def limoe(capacity: bool) -> nn.Module:
    from moezoo.modalities.language_image import LIMoE

    return LIMoE(img_size=8, patch_size=4, in_chans=1, vocab_size=20, max_text_len=6, embed_dim=12, depth=2,
                 num_heads=2, proj_dim=8, num_experts=4, k=1, capacity_factor=0.5 if capacity else 4.0,
                 backend="torch")


def limoe_objective(model: nn.Module, rank: int) -> Tensor:
    g = _gen(rank)
    images, text = torch.randn(3, 1, 8, 8, generator=g), torch.randint(1, 20, (3, 6), generator=g)
    image_emb, text_emb, scale = model(images, text, torch.ones(3, 6, dtype=torch.bool))
    return (scale * image_emb @ text_emb.t()).logsumexp(-1).sum() + aux_loss(model)


def time_moe(capacity: bool) -> nn.Module:
    from moezoo.modalities.timeseries import TimeMoE

    model = TimeMoE(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
                    horizon_lengths=[1, 2], backend="torch")
    if capacity:
        for layer in model.model.layers:
            layer.ffn_layer.router.capacity_factor = 0.5
    return model


def time_moe_objective(model: nn.Module, rank: int) -> Tensor:
    x = torch.randn(2, 9, generator=_gen(rank)).cumsum(-1)
    return model.loss(x[:, :-1], x[:, 1:]).loss


def speech_moe(capacity: bool) -> nn.Module:
    from moezoo.modalities.speech import SpeechMoE

    return SpeechMoE(input_dim=6, vocab_size=7, dim=12, depth=2, hidden=16, num_experts=4, k=2, stack=2,
                     embed_dim=8, embed_depth=1, embed_hidden=12, dropout=0.0, backend="torch")


def speech_objective(model: nn.Module, rank: int) -> Tensor:
    g = _gen(rank)
    features, lengths = torch.randn(2, 10, 6, generator=g), torch.tensor([10, 7])
    out = model(features, lengths)
    return (out.logits * torch.randn(out.logits.shape, generator=g)).sum() + aux_loss(model)


def sigma_moe_lm(capacity: bool) -> nn.Module:
    from moezoo.modalities.text import TransformerLM

    return TransformerLM(vocab_size=20, dim=16, depth=2, context_length=8, attention="switchhead", num_heads=2,
                         head_dim=8, attention_experts=4, attention_k=2, mlp="sigma_moe", mlp_experts=4,
                         mlp_hidden=8, mlp_k=2, backend="torch")


def lm_objective(model: nn.Module, rank: int) -> Tensor:
    tokens = torch.randint(0, 20, (2, 8), generator=_gen(rank))
    return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()) \
        + aux_loss(model)


def _transformers(model_type: str):
    """A tiny transformers model of ``model_type`` converted by moezoo.from_transformers, in training
    mode; with ``capacity`` its top-k routers drop tokens (DeepSeek-V3's sigmoid router has none)."""

    def build(capacity: bool) -> nn.Module:
        from moezoo.zoo.hf import TransformersMoE, from_transformers
        from tests.zoo.tiny_transformers import tiny_model

        model = from_transformers(tiny_model(model_type), backend="torch").train()
        if capacity:
            for layer in model.modules():
                if isinstance(layer, TransformersMoE) and hasattr(layer.router, "capacity_factor"):
                    layer.router.capacity_factor = 0.5
        return model

    return build


def transformers_objective(model: nn.Module, rank: int) -> Tensor:
    from tests.zoo.tiny_transformers import tokens

    ids = tokens(seed=100 + rank)
    return model(ids, labels=ids).loss + aux_loss(model)


FAMILIES = {
    "vmoe": (vmoe, image_objective),
    "soft_moe": (soft_moe, image_objective),
    "limoe": (limoe, limoe_objective),
    "time_moe": (time_moe, time_moe_objective),
    "speech_moe": (speech_moe, speech_objective),
    "sigma_moe_lm": (sigma_moe_lm, lm_objective),
    "mixtral_hf": (_transformers("mixtral"), transformers_objective),
    "deepseek_v3_hf": (_transformers("deepseek_v3"), transformers_objective),
}
