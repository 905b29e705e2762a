"""``Forecasting``: Time-MoE's objective (Huber over every head + its balance loss), forecast metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.modalities.timeseries.model import TimeMoE
from moezoo.task import MoETask

__all__ = ["Forecasting"]


class Forecasting(MoETask):
    """Pre-training and fine-tuning of a :class:`~moezoo.modalities.timeseries.TimeMoE`.

    Training and validation batches hold ``input_ids``, ``labels`` and ``loss_mask`` (batch,
    length); the loss is the reference's: the mean over heads of the masked Huber loss (delta 2)
    plus ``model.router_aux_loss_factor`` times the balance loss over all layers' router logits.
    Logged: ``{stage}/loss``, ``{stage}/ar_loss``, ``{stage}/balance_loss`` (unweighted; equals k
    at perfect balance). Extra per-layer router losses can be added with ``aux_loss_weights``
    (e.g. ``{"z_loss": 0.001}``); none by default, as the reference. Test batches hold ``context``
    and ``target``: greedy :meth:`TimeMoE.forecast` and its MSE / MAE.

    Args:
        model: the network.
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask` (the reference
            fine-tunes with AdamW betas (0.9, 0.95), weight decay 0.1, lr 1e-4 cosine to 5e-5).
    """

    def __init__(self, model: TimeMoE, **kwargs) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(model, TimeMoE):
            raise ValueError(f"Forecasting: model must be a TimeMoE, got {type(model).__name__}")

    def step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, int]:
        """The training objective on windows (training and validation)."""
        x = batch["input_ids"]
        out = self.model.loss(x, batch["labels"], batch.get("loss_mask"))
        on_step = stage == "train"
        log = dict(batch_size=x.shape[0], on_step=on_step, on_epoch=True)
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, **log)
        self.log(f"{stage}/ar_loss", out.ar_loss.detach(), **log)
        if out.aux_loss is not None:
            self.log(f"{stage}/balance_loss", out.aux_loss.detach(), **log)
        return out.loss, x.shape[0]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        target = batch["target"]
        forecast = self.model.forecast(batch["context"], target.shape[1])
        log = dict(batch_size=target.shape[0], on_step=False, on_epoch=True)
        self.log("test/mse", torch.mean((forecast - target) ** 2), **log)
        self.log("test/mae", torch.mean(torch.abs(forecast - target)), **log)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """A forecast from ``batch["context"]`` (test windows) or ``batch["input_ids"]`` (training
        windows) or a bare (batch, length) tensor: (batch, horizon), the horizon of ``batch["target"]``
        or else the longest head's."""
        if not isinstance(batch, dict):
            return self.model.forecast(batch, max(self.model.horizon_lengths))
        context = batch["context"] if "context" in batch else batch["input_ids"]
        horizon = batch["target"].shape[1] if "target" in batch else max(self.model.horizon_lengths)
        return self.model.forecast(context, horizon)
