"""Vision: V-MoE on timm's ViT, the image classification task and image data."""

from moezoo.modalities.vision.data import ImageDataModule, load_digits_splits
from moezoo.modalities.vision.model import SoftMoEVisionTransformer, VisionTransformerMoE
from moezoo.modalities.vision.task import ImageClassification

__all__ = [
    "ImageClassification",
    "ImageDataModule",
    "SoftMoEVisionTransformer",
    "VisionTransformerMoE",
    "load_digits_splits",
]
