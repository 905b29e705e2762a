"""Evaluation of image classifiers on the built-in test split, for model cards and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moezoo.layers.routed import routed_layers
from moezoo.modalities.vision.data import ImageDataModule

__all__ = ["evaluate_classifier", "evaluate_digits", "evaluate_image_folder"]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, datamodule: ImageDataModule, split: str = "test") -> dict[str, float]:
    """Accuracy, mean cross-entropy and mean dropped-assignment fraction of ``model`` on ``split``.

    Evaluation routes batches of ``datamodule.eval_batch_size`` images in order, so routing groups
    (and capacity drops) are the same on every run.
    """
    datamodule.setup()
    loader = {"test": datamodule.test_dataloader, "val": datamodule.val_dataloader}[split]()
    model.eval()
    correct, total, loss_sum, dropped = 0, 0, 0.0, []
    for images, labels in loader:
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
        dropped += [layer.last_stats["dropped_fraction"].item() for _, layer in routed_layers(model)
                    if "dropped_fraction" in layer.last_stats]
    result = {"accuracy": correct / total, "loss": loss_sum / total, "examples": total}
    if dropped:
        result["dropped_fraction"] = sum(dropped) / len(dropped)
    return result


def evaluate_digits(model: nn.Module) -> dict[str, float]:
    """:func:`evaluate_classifier` on the 270 held-out built-in digits (16 px, batches of 64)."""
    return evaluate_classifier(model, ImageDataModule("digits", image_size=16, eval_batch_size=64), "test")


def evaluate_image_folder(model: nn.Module, data_dir: str | None = None, *, split: str = "val",
                          batch_size: int = 64, num_workers: int = 0) -> dict[str, float]:
    """:func:`evaluate_classifier` on an ImageFolder tree (``data_dir/val/<class>/*.JPEG``, e.g.
    ILSVRC2012) with the model's own preprocessing: its ``moezoo_cfg.input_spec`` (a vmoe
    entry's: resolution, resizing as its config, pixels in [-1, 1]).

    Batches of ``batch_size`` images form the routing groups, so keep it a multiple of the
    entry's images per group (8) for the released configs' routing.
    """
    if not data_dir:
        raise ValueError("evaluate_image_folder needs data_dir: a folder holding val/<class>/<images> "
                         "(moezoo zoo eval NAME --data-dir DIR)")
    cfg = getattr(model, "moezoo_cfg", None)
    spec = getattr(cfg, "input_spec", None) or {}
    if "image_size" not in spec:
        raise ValueError("evaluate_image_folder: the model has no moezoo_cfg.input_spec with an image_size")
    channels = spec.get("channels", 3)
    datamodule = ImageDataModule(
        "folder", root=data_dir, image_size=spec["image_size"], batch_size=batch_size, num_workers=num_workers,
        mean=(spec.get("mean", 0.5),) * channels, std=(spec.get("std", 0.5),) * channels,
        crop_pct=spec.get("crop_pct"), crop_mode=spec.get("crop_mode"),
        interpolation=spec.get("interpolation", "bilinear"),
    )
    return evaluate_classifier(model, datamodule, split)
