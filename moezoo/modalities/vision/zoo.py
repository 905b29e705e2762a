"""Vision zoo entries: model configurations as data (open_clip style), registered by name."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from moezoo.modalities.vision.model import SoftMoEVisionTransformer, VisionTransformerMoE
from moezoo.modalities.vision.timm_models import (
    hub_config,
    pretrained_filter,
    register_with_timm,
    timm_cfg,
    vision_features,
)
from moezoo.modalities.vision.vmoe_checkpoint import GCS_HTTPS
from moezoo.zoo.registry import ModelEntry, PretrainedCfg, ShippedEvaluation, register_shipped
from moezoo.zoo.registry import register_model as _register_model

#: Every vision entry, in registration order (each is also a timm model, see timm_models).
ENTRIES: list[ModelEntry] = []


def register_model(name: str, builder, *, pretrained_cfg: PretrainedCfg | None = None, **kwargs: Any) -> ModelEntry:
    """:func:`moezoo.zoo.registry.register_model` with timm's conventions: the entry's timm
    ``pretrained_cfg`` (from its arguments and input spec), the pretrained filter, ``features_only``
    and timm's hub config."""
    spec = pretrained_cfg.input_spec if pretrained_cfg is not None else None
    args = {k: v for k, v in kwargs.items() if k not in ("modality", "description", "evaluate", "card")}
    entry = _register_model(
        name, builder, pretrained_cfg=pretrained_cfg, timm_cfg=timm_cfg(args, _timm_input(spec)),
        pretrained_filter=pretrained_filter, feature_wrapper=vision_features, hf_config=hub_config, **kwargs,
    )
    ENTRIES.append(entry)
    return entry


def _timm_input(spec: dict | None) -> dict | None:
    """An input spec in timm's names (``image_size`` is the entry's own ``img_size``)."""
    if spec is None:
        return None
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: spec[k] for k in keys if k in spec}

#: V-MoE backbone sizes (MODELS.md §1a; note V-MoE "S" has 8 layers).
VMOE_SIZES = {
    "s16": dict(embed_dim=512, depth=8, num_heads=8, mlp_ratio=4.0, patch_size=16),
    "b16": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16),
    "l16": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16),
}

#: The tiny CPU model of configs/vision/vmoe_ti_digits.yaml.
VMOE_TI_DIGITS = dict(
    img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0,
    moe_blocks="every_2", num_experts=8, k=2, capacity_factor=1.05, eval_capacity_factor=1.05,
)

for size, dims in VMOE_SIZES.items():
    register_model(
        f"vmoe_{size}",
        VisionTransformerMoE,
        modality="vision",
        description=f"V-MoE-{size.upper()[0]}/{size[1:]}, E=32, k=2, every 2nd block, 224px, 1000 classes (paper defaults)",
        img_size=224, num_classes=1000, moe_blocks="every_2", num_experts=32, k=2, **dims,
    )

#: The preprocessing and evaluation data of the shipped digits entries.
_DIGITS_INPUT = {"image_size": 16, "channels": 1, "mean": 0.5, "std": 0.5, "pixel_range": "digits 0..16 scaled to [-1, 1]",
                 "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
_DIGITS_TEST = ShippedEvaluation(
    "moezoo.modalities.vision.evaluate:evaluate_digits", task="image-classification", split="test",
    dataset_name="scikit-learn digits (UCI optdigits, 1,797 images, 8x8 upsampled to 16x16)",
    datasets=("sklearn-digits",), card_metrics=("accuracy",))

register_shipped(
    "vmoe_ti_digits",
    VisionTransformerMoE,
    modality="vision",
    input_spec=_DIGITS_INPUT,
    register=register_model,
    description="V-MoE-Ti on scikit-learn digits (16px, E=8, k=2, every 2nd block); trains on a CPU in minutes",
    evaluation=_DIGITS_TEST,
    tags=["mixture-of-experts", "v-moe", "image-classification", "batch-prioritized-routing"],
    architecture=(
        "ViT (timm `VisionTransformer`): 16x16 single-channel images, 4x4 patches (16 patches + class "
        "token = 17 tokens), width 96, 6 pre-LN blocks, 3 heads. The MLPs of blocks 1, 3 and 5 "
        "(V-MoE \"every 2\") are MoE layers of 8 experts (each the ViT MLP, 96 -> 384 -> 96, GELU), "
        "identically initialised. Routing: V-MoE's `BatchPrioritizedRouter`, softmax then top-2, "
        "noise std 1/8 in training, groups of 8 images (136 tokens), capacity ceil(2 * 136 * C / 8) "
        "rounded up to a multiple of 4 with C = 1.05 (36 places), Batch Prioritized Routing on; "
        "importance and load losses, 0.005 each."
    ),
    limitations=(
        "A demonstration-scale model: 8x8 digits from 13 writers, 270 test images (one image is 0.37 "
        "points of accuracy). The evaluation routes batches of 64 images in groups of 8, so capacity "
        "drops depend on batch composition. Weights ship in float16."
    ),
    **VMOE_TI_DIGITS,
)

#: The dense baseline of vmoe_ti_digits with the same active parameters per token (mlp_ratio 6:
#: 3 blocks x 4 + 3 MoE blocks x 2 experts x 4 = 6 blocks x 6), configs/vision/vit_ti_digits.yaml.
VIT_TI_DIGITS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                     mlp_ratio=6.0)

register_shipped(
    "vit_ti_digits",
    VisionTransformer,
    modality="vision",
    input_spec=_DIGITS_INPUT,
    register=register_model,
    description="Dense ViT-Ti on scikit-learn digits with vmoe_ti_digits' active parameters (baseline, upcycling source)",
    evaluation=_DIGITS_TEST,
    tags=["vit", "image-classification", "dense-baseline"],
    architecture=(
        "Dense ViT (timm `VisionTransformer`): 16x16 single-channel images, 4x4 patches + class token, "
        "width 96, 6 pre-LN blocks, 3 heads, MLP ratio 6 so that its parameters per token equal the "
        "active parameters of vmoe_ti_digits. No routing."
    ),
    limitations=(
        "A demonstration-scale baseline: 270 test images (one image is 0.37 points of accuracy). "
        "Weights ship in float16."
    ),
    **VIT_TI_DIGITS,
)


# -- google-research/vmoe's released checkpoints ----------------------------------------------
#
# Architectures and routing as vmoe's config files (vmoe/configs at 942a78b) set them; the
# weights are converted from vmoe's msgpack shards on first use (vmoe_convert.zoo_weights).

_VMOE_S32 = dict(patch_size=32, embed_dim=512, depth=8, num_heads=8, mlp_ratio=4.0, moe_blocks=[5, 7], num_experts=8)
_VMOE_B16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 moe_blocks=[1, 3, 5, 7, 9, 11], num_experts=8)
#: vmoe's routing at inference in every released config: top-k per 8-image group (the E^3
#: CIFAR-100 config: 128 images), capacity rounded up to a multiple of 4, no BPR, bfloat16
#: dispatch, the tanh GELU.
_VMOE_ROUTING = dict(activation="gelu_tanh", batch_priority=False, capacity_multiple_of=4, group_images=8,
                     bfloat16_dispatch=True)

_RESIZE_SMALL = "resize_small(256)|central_crop(224)|value_range(-1,1)"


def _input(size: int, pipeline: str) -> dict:
    squash = pipeline.startswith("resize(")
    return {"image_size": size, "channels": 3, "mean": 0.5, "std": 0.5, "pixel_range": "[-1, 1]",
            "vmoe_preprocessing": pipeline, "crop_pct": 1.0 if squash else 224 / 256,
            "crop_mode": "squash" if squash else "center", "interpolation": "bilinear"}


#: The light1 config's architecture and routing (the medium checkpoint's are assumed equal).
_S32_LIGHT1 = dict(_VMOE_S32, img_size=224, num_classes=1000, representation_size=512, k=2, capacity_factor=1.05,
                   eval_capacity_factor=4.0)

#: name -> (architecture and routing, preprocessing, description, published results, notes)
VMOE_RELEASES = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": (
        _S32_LIGHT1,
        _input(224, _RESIZE_SMALL),
        "V-MoE-S/32 (8 blocks), E=8 in blocks 5 and 7, k=2, trained on ILSVRC2012 with RandAugment (light1) for "
        "300 epochs, 224px",
        "configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py (mean of 3 runs): ILSVRC2012 held-out "
        "train[99%:] 76.8%, ILSVRC2012 validation set (vmoe's 'test') 73.1%, ReaL 74.4%, ImageNet V2 59.2%.",
        "Evaluated by its config at capacity factor 4.0 (trained at 1.05).",
    ),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": (
        dict(_VMOE_S32, img_size=384, num_classes=1000, k=2, capacity_factor=1.5, eval_capacity_factor=1.5),
        _input(384, "resize(384)|value_range(-1,1)"),
        "V-MoE-S/32 light1 fine-tuned on ILSVRC2012 at 384px (E=8 in blocks 5 and 7, k=2, no pre-logits)",
        "configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py (mean of 3 fine-tuning "
        "runs): ILSVRC2012 held-out train[99%:] 78.8%, ILSVRC2012 validation set 75.9%, ReaL 77.1%, ImageNet V2 "
        "62.0%.",
        "",
    ),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": (
        _S32_LIGHT1,
        _input(224, _RESIZE_SMALL),
        "V-MoE-S/32, E=8 in blocks 5 and 7, k=2, trained on ILSVRC2012 with RandAugment (medium) for 1000 epochs, "
        "224px",
        "none in the vmoe repository.",
        "vmoe ships no config for this checkpoint: architecture, routing and preprocessing are assumed equal to "
        "the light1 config's (the README describes it as the same model trained longer).",
    ),
    "vmoe_b16_imagenet21k_randaug_strong": (
        dict(_VMOE_B16, img_size=224, num_classes=21843, k=2, capacity_factor=1.05, eval_capacity_factor=1.05),
        _input(224, _RESIZE_SMALL),
        "V-MoE-B/16, E=8 in every odd block, k=2, trained on ImageNet-21k with RandAugment (strong), 224px",
        "none for this checkpoint; configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_cifar10.py reports "
        "98.7% CIFAR-10 test accuracy after fine-tuning it (that fine-tuned checkpoint is not released).",
        "Architecture as configs/vmoe_paper/pretrain_imagenet21k.py (no pre-logits layer); if the released file "
        "has one, pass representation_size=768.",
    ),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": (
        dict(_VMOE_B16, img_size=384, num_classes=1000, k=2, capacity_factor=1.5, eval_capacity_factor=1.5),
        _input(384, "resize(384)|value_range(-1,1)"),
        "V-MoE-B/16 (ImageNet-21k) fine-tuned on ILSVRC2012 at 384px, E=8 in every odd block, k=2",
        "configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py (mean of 3 fine-tuning runs): "
        "ILSVRC2012 held-out train[99%:] 89.2%, ILSVRC2012 validation set 85.6%, ReaL 84.1%, ImageNet V2 76.1%.",
        "",
    ),
    "eee_s32_last2_ilsvrc2012": (
        dict(_VMOE_S32, img_size=224, num_classes=1000, representation_size=512, k=1, ensemble_size=2,
             capacity_factor=1.5, eval_capacity_factor=1.5),
        _input(224, _RESIZE_SMALL),
        "E^3-S/32: 2 ensemble members x 4 of the 8 experts in blocks 5 and 7, k=1, trained on ILSVRC2012 with "
        "RandAugment for 300 epochs, 224px",
        "none in the vmoe repository.",
        "vmoe ships no config for this checkpoint: routing (C=1.5) as its CIFAR-100 fine-tuning config, "
        "preprocessing as the V-MoE ILSVRC2012 configs.",
    ),
    "eee_s32_last2_ilsvrc2012_ft_cifar100": (
        dict(_VMOE_S32, img_size=128, num_classes=100, representation_size=512, k=1, ensemble_size=2,
             capacity_factor=1.5, eval_capacity_factor=1.5, group_images=128),
        _input(128, "resize(128)|value_range(-1,1)"),
        "E^3-S/32 fine-tuned on CIFAR-100 at 128px: 2 members x 4 of the 8 experts in blocks 5 and 7, k=1",
        "configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py: CIFAR-100 test accuracy 81.31% (mean of 3 "
        "fine-tuning runs).",
        "Its config routes groups of 128 images (per device), not 8.",
    ),
}

for _name, (_args, _spec, _description, _published, _notes) in VMOE_RELEASES.items():
    register_model(
        _name,
        VisionTransformerMoE,
        modality="vision",
        description=_description,
        pretrained_cfg=PretrainedCfg(
            source=f"url:{GCS_HTTPS}vmoe_checkpoints/{_name}",
            converter="moezoo.modalities.vision.vmoe_convert:zoo_weights",
            input_spec=_spec,
            card=f"model_cards/{_name}.md",
        ),
        evaluate="moezoo.modalities.vision.evaluate:evaluate_image_folder",
        card={
            "tags": ["moezoo", "mixture-of-experts", "v-moe", "vision", "google-research-vmoe"],
            "architecture": (
                f"Google's released checkpoint `gs://vmoe_checkpoints/{_name}` (google-research/vmoe), fetched "
                f"over HTTPS from `{GCS_HTTPS}vmoe_checkpoints/{_name}` and converted to safetensors on first "
                "use. Inputs: RGB, vmoe preprocessing "
                f"`{_spec['vmoe_preprocessing']}` (pixels scaled to [-1, 1]). Routing as its vmoe config: "
                "top-k per group of images, no Batch Prioritized Routing, capacity rounded up to a multiple of 4, "
                "expert inputs and outputs rounded to bfloat16, tanh GELU. " + _notes
            ).strip(),
            "published": f"From vmoe's config files, as published: {_published} Not measured here.",
        },
        **_VMOE_ROUTING | _args,
    )

register_model(
    "vmoe_vit",
    VisionTransformerMoE,
    modality="vision",
    description="V-MoE / E^3 ViT of any architecture (the constructor's defaults otherwise): what `moezoo zoo "
                "convert vmoe` exports for a checkpoint that is not a zoo entry",
)

register_model(
    "soft_moe_vit",
    SoftMoEVisionTransformer,
    modality="vision",
    description="Soft MoE ViT of any architecture (the constructor's defaults otherwise): what `moezoo zoo "
                "convert vmoe` exports for a Soft MoE checkpoint",
)

register_with_timm(ENTRIES)
