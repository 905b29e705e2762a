"""``ImageClassification``: cross-entropy plus the weighted routing losses, accuracy, router stats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from moezoo.task import MoETask

__all__ = ["ImageClassification"]


class ImageClassification(MoETask):
    """Image classification with any image model returning (batch, classes) logits.

    Args:
        model: e.g. :class:`~moezoo.modalities.vision.VisionTransformerMoE`.
        num_classes: classes (default: ``model.num_classes``).
        label_smoothing: cross-entropy label smoothing.
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(model, **kwargs)
        classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if not isinstance(classes, int) or classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (or the model must define it), got {classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = classes
        self.label_smoothing = label_smoothing
        self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(classes, average="micro") for s in ("train_", "val_", "test_")})

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        self._batch_size = images.shape[0]
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = self.accuracy[stage + "_"]
        acc(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=True, batch_size=self._batch_size)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=self._batch_size)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.add_aux_loss(self._shared_step(batch, "train"), "train")
        self.maybe_log_routing()
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")
        self.log_routing("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")
        self.log_routing("test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self.model(images), dim=-1)
