"""Vision zoo entries: model configurations as data (open_clip style), registered by name."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from moezoo.modalities.vision.model import VisionTransformerMoE
from moezoo.zoo.registry import register_model, shipped_weights

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

register_model(
    "vmoe_ti_digits",
    VisionTransformerMoE,
    modality="vision",
    description="V-MoE-Ti on scikit-learn digits (16px, E=8, k=2, every 2nd block); trains on a CPU in minutes",
    pretrained_cfg=shipped_weights(
        "vmoe_ti_digits",
        license="apache-2.0",
        input_spec={"image_size": 16, "channels": 1, "mean": 0.5, "std": 0.5, "pixel_range": "digits 0..16 scaled to [-1, 1]"},
        card="model_cards/vmoe_ti_digits.md",
    ),
    evaluate="moezoo.modalities.vision.evaluate:evaluate_digits",
    card={
        "config": "configs/vision/vmoe_ti_digits.yaml",
        "dataset_name": "scikit-learn digits (UCI optdigits, 1,797 images, 8x8 upsampled to 16x16)",
        "datasets": ["sklearn-digits"],
        "split": "test",
        "tags": ["moezoo", "mixture-of-experts", "v-moe", "image-classification", "batch-prioritized-routing"],
        "task": "image-classification",
        "card_metrics": ["accuracy"],
        "architecture": (
            "ViT (timm `VisionTransformer`): 16x16 single-channel images, 4x4 patches (16 patches + class "
            "token = 17 tokens), width 96, 6 pre-LN blocks, 3 heads. The MLPs of blocks 1, 3 and 5 "
            "(V-MoE \"every 2\") are MoE layers of 8 experts (each the ViT MLP, 96 -> 384 -> 96, GELU), "
            "identically initialised. Routing: V-MoE's `BatchPrioritizedRouter`, softmax then top-2, "
            "noise std 1/8 in training, groups of 8 images (136 tokens), capacity ceil(2 * 136 * C / 8) "
            "rounded up to a multiple of 4 with C = 1.05 (36 places), Batch Prioritized Routing on; "
            "importance and load losses, 0.005 each."
        ),
        "limitations": (
            "A demonstration-scale model: 8x8 digits from 13 writers, 270 test images (one image is 0.37 "
            "points of accuracy). The evaluation routes batches of 64 images in groups of 8, so capacity "
            "drops depend on batch composition. Weights ship in float16."
        ),
    },
    **VMOE_TI_DIGITS,
)

#: The dense baseline of vmoe_ti_digits with the same active parameters per token (mlp_ratio 6:
#: 3 blocks x 4 + 3 MoE blocks x 2 experts x 4 = 6 blocks x 6), configs/vision/vit_ti_digits.yaml.
VIT_TI_DIGITS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                     mlp_ratio=6.0)

register_model(
    "vit_ti_digits",
    VisionTransformer,
    modality="vision",
    description="Dense ViT-Ti on scikit-learn digits with vmoe_ti_digits' active parameters (baseline, upcycling source)",
    pretrained_cfg=shipped_weights(
        "vit_ti_digits",
        license="apache-2.0",
        input_spec={"image_size": 16, "channels": 1, "mean": 0.5, "std": 0.5, "pixel_range": "digits 0..16 scaled to [-1, 1]"},
        card="model_cards/vit_ti_digits.md",
    ),
    evaluate="moezoo.modalities.vision.evaluate:evaluate_digits",
    card={
        "config": "configs/vision/vit_ti_digits.yaml",
        "dataset_name": "scikit-learn digits (UCI optdigits, 1,797 images, 8x8 upsampled to 16x16)",
        "datasets": ["sklearn-digits"],
        "split": "test",
        "tags": ["moezoo", "vit", "image-classification", "dense-baseline"],
        "task": "image-classification",
        "card_metrics": ["accuracy"],
        "architecture": (
            "Dense ViT (timm `VisionTransformer`): 16x16 single-channel images, 4x4 patches + class token, "
            "width 96, 6 pre-LN blocks, 3 heads, MLP ratio 6 so that its parameters per token equal the "
            "active parameters of vmoe_ti_digits. No routing."
        ),
        "limitations": (
            "A demonstration-scale baseline: 270 test images (one image is 0.37 points of accuracy). "
            "Weights ship in float16."
        ),
    },
    **VIT_TI_DIGITS,
)
