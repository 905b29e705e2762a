"""Vision: V-MoE, E^3 and Soft MoE on timm's ViT, google-research/vmoe checkpoints, the image
classification task and image data."""

from moezoo.modalities.vision.data import ImageDataModule, load_digits_splits
from moezoo.modalities.vision.model import ACTIVATIONS, SoftMoEVisionTransformer, VisionTransformerMoE
from moezoo.modalities.vision.task import ImageClassification
from moezoo.modalities.vision.vmoe_checkpoint import read_vmoe_checkpoint
from moezoo.modalities.vision.vmoe_convert import from_vmoe_checkpoint

__all__ = [
    "ACTIVATIONS",
    "ImageClassification",
    "ImageDataModule",
    "SoftMoEVisionTransformer",
    "VisionTransformerMoE",
    "from_vmoe_checkpoint",
    "load_digits_splits",
    "read_vmoe_checkpoint",
]
