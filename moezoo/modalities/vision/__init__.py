"""Vision: V-MoE on timm's ViT, the image classification task and image data."""

from moezoo.modalities.vision.data import ImageDataModule, load_digits_splits
from moezoo.modalities.vision.model import (
    VMOE_LOSS_WEIGHTS,
    SoftMoEVisionTransformer,
    VisionTransformerMoE,
    bpr_router_factory,
    moe_block_indices,
    set_routing,
)
from moezoo.modalities.vision.task import ImageClassification

__all__ = [
    "ImageClassification",
    "ImageDataModule",
    "SoftMoEVisionTransformer",
    "VMOE_LOSS_WEIGHTS",
    "VisionTransformerMoE",
    "bpr_router_factory",
    "load_digits_splits",
    "moe_block_indices",
    "set_routing",
]
