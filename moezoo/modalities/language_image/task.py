"""``ContrastiveImageText``: the contrastive loss plus routing losses; zero-shot and retrieval metrics."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from moezoo.modalities.language_image.evaluate import retrieval_recall, zero_shot_accuracy
from moezoo.modalities.language_image.model import contrastive_loss
from moezoo.task import MoETask

__all__ = ["ContrastiveImageText"]


class ContrastiveImageText(MoETask):
    """Contrastive image-text training (CLIP's symmetric loss with the model's learned temperature).

    Validation and test log zero-shot classification accuracy (class prompts from the data module)
    and image-to-text / text-to-image recall@1 and @5 over the whole split. ``fit`` saves the data
    module's tokenizer to ``<log dir>/tokenizer``.

    Args:
        model: e.g. :class:`~moezoo.modalities.language_image.LIMoE` (``forward(images, text, mask)``
            returning two normalised embeddings and the logit scale; ``encode`` for prompts).
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._outputs: list[tuple[Tensor, Tensor, Tensor]] = []

    def on_fit_start(self) -> None:
        # The token ids the model learns mean nothing without the tokenizer: keep it beside the
        # run's checkpoints (``<log dir>/tokenizer``; load it with ImageTextDataModule(tokenizer=...)).
        super().on_fit_start()
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "tokenizer"  # every rank asks
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.trainer.is_global_zero and datamodule is not None and hasattr(datamodule, "save_tokenizer"):
            datamodule.save_tokenizer(directory)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, ids, mask, _ = batch
        image, text, scale = self.model(images, ids, mask)
        loss = contrastive_loss(image, text, scale)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        self.log("train/logit_scale", scale.detach(), batch_size=images.shape[0])
        return self.add_aux_loss(loss, "train", images.shape[0])

    def _eval_step(self, batch) -> None:
        images, ids, mask, labels = batch
        image, text, _ = self.model(images, ids, mask)
        self._outputs.append((image, text, labels))

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._outputs:
            return
        image, text, labels = (torch.cat(t) for t in zip(*self._outputs))
        self._outputs.clear()
        if self.trainer.world_size > 1:
            # Recall is over the whole pool of candidates, not each rank's shard (a smaller pool
            # inflates it). Lightning's distributed sampler gives every rank the same count.
            image, text, labels = (self.all_gather(t).flatten(0, 1) for t in (image, text, labels))
        metrics = retrieval_recall(image, text)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "tokenize") and (labels >= 0).all():
            metrics["zero_shot_accuracy"] = zero_shot_accuracy(self.model, datamodule, image, labels)
        for key, value in metrics.items():
            # Every rank computed the same value from the gathered pool.
            self.log(f"{stage}/{key}", value, prog_bar=key in ("zero_shot_accuracy", "i2t_recall@1"))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        """Normalised image and text embeddings of a batch."""
        images, ids, mask = batch[:3]
        image, text, _ = self.model(images, ids, mask)
        return {"image": image, "text": text}
