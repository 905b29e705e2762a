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
        mixup_alpha: timm mixup alpha in training (V-MoE's ImageNet recipe: 0.2); 0 = off.
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if not isinstance(classes, int) or classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (or the model must define it), got {classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}")
        self.num_classes = classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup_alpha, label_smoothing=label_smoothing, num_classes=classes)
        self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(classes, average="micro") for s in ("train_", "val_", "test_")})

    def step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, int]:
        images, labels = batch
        batch_size = images.shape[0]
        if stage == "train" and self.mixup is not None and images.shape[0] % 2 == 0:
            mixed, soft_targets = self.mixup(images, labels)
            logits = self.model(mixed)
            loss = torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = self.accuracy[stage + "_"]
        acc(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=True,
                 batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss, batch_size

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self.model(images), dim=-1)
