"""Vision zoo entries: model configurations as data (open_clip style), registered by name."""

from __future__ import annotations

from moezoo.modalities.vision.model import VisionTransformerMoE
from moezoo.zoo.registry import register_model

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
    **VMOE_TI_DIGITS,
)
