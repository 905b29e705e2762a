"""Vision: V-MoE, E^3 and Soft MoE on timm's ViT, google-research/vmoe checkpoints, the image
classification task and image data."""

import importlib

from moezoo.modalities.vision.model import ACTIVATIONS, SoftMoEVisionTransformer, VisionTransformerMoE
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

#: Imported on first use: the task and the data modules need Lightning, which ``import moezoo``
#: (it registers the vision entries with timm) should not pay for.
_LAZY = {"ImageClassification": "task", "ImageDataModule": "data", "load_digits_splits": "data"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
