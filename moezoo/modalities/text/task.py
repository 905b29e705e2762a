"""``LanguageModeling``: next-token cross-entropy plus the weighted routing losses; perplexity, bits per
byte. ``CausalLMFineTuning``: the same for a transformers MoE causal LM converted to moezoo."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from moezoo.task import MoETask

__all__ = ["CausalLMFineTuning", "LanguageModeling", "lm_loss", "pop_split_nll"]


def lm_loss(model: Callable[[Tensor], Tensor], batch: Tensor) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy (nats) of ``model`` (any callable mapping (B, T) ids to
    (B, T, vocab) logits) on windows ``batch`` (B, T+1) and the number of predicted tokens (B * T)."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must have shape (batch, context + 1), got shape {tuple(batch.shape)}")
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)), targets.numel()


def pop_split_nll(metric: MeanMetric) -> Tensor | None:
    """The token-weighted mean NLL a split's epoch accumulated in ``metric`` (None if it saw no batch),
    resetting it for the next epoch."""
    if metric.update_count == 0:
        return None
    nll = metric.compute()
    metric.reset()
    return nll


class LanguageModeling(MoETask):
    """Causal language modelling with any model mapping (B, T) ids to (B, T, vocab) logits.

    Logs ``{stage}/loss`` (token-mean cross-entropy in nats), and per validation/test epoch
    ``{stage}/ppl`` (exp of the token-mean loss over the whole split) and ``{stage}/bpb`` (bits per
    UTF-8 byte: loss / ln 2 / bytes-per-token, where bytes-per-token is ``bytes_per_token`` or, by
    default, the data module's measured ratio of the split (1 for the byte tokenizer)).

    Args:
        model: e.g. :class:`~moezoo.modalities.text.TransformerLM`.
        bytes_per_token: fixed UTF-8 bytes per token for bits per byte (None: ask the data module).
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(self, model: nn.Module, bytes_per_token: float | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        if bytes_per_token is not None and bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
        self.bytes_per_token = bytes_per_token
        self.nll = nn.ModuleDict({s: MeanMetric() for s in ("val_", "test_")})

    def logits(self, ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, vocab) next-token logits of the model."""
        return self.model(ids)

    def step(self, batch: Tensor, stage: str) -> tuple[Tensor, int]:
        loss, tokens = lm_loss(self.logits, batch)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=tokens)
        if stage != "train":
            self.nll[stage + "_"].update(loss.detach(), weight=tokens)
        return loss, tokens

    def _epoch_end(self, stage: str) -> None:
        nll = pop_split_nll(self.nll[stage + "_"])
        if nll is None:
            return
        self.log(f"{stage}/ppl", torch.exp(nll), prog_bar=stage == "val")
        self.log(f"{stage}/bpb", nll / math.log(2.0) / self._bytes_per_token(stage))

    def _bytes_per_token(self, stage: str) -> float:
        if self.bytes_per_token is not None:
            return self.bytes_per_token
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "bytes_per_token"):
            return datamodule.bytes_per_token(stage)
        return 1.0

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Next-token log-probabilities of the window's first ``context`` tokens."""
        return torch.log_softmax(self.logits(batch[:, :-1]).float(), dim=-1)


class CausalLMFineTuning(LanguageModeling):
    """Fine-tune a transformers MoE causal LM as a moezoo model: the model is loaded (a local folder
    or a hub id) or built at random from a config, and converted in place by
    :func:`moezoo.zoo.hf.from_transformers`, so the moezoo recipes, routing monitor, expert
    parallelism and backends apply; the objective is next-token cross-entropy plus the model's own
    auxiliary loss (``aux_loss_weights=None`` keeps each layer's: transformers' pooled balancing
    loss with ``router_aux_loss_coef``). Save the result with ``task.model.save_pretrained(dir)``:
    transformers' own layout.

    Args:
        pretrained: a local folder or hub id for ``AutoModelForCausalLM.from_pretrained``.
        config: instead, a transformers config as a mapping with ``model_type`` (random weights).
        backend: the expert banks' backend ("auto", "torch", "triton").
        bias_update_rate: DeepSeek-V3's loss-free balancing rate (see ``from_transformers``).
        dtype: the weights' dtype ("float32", "bfloat16", ...); None: the checkpoint's, or fp32.
        gradient_checkpointing: transformers' activation checkpointing per decoder layer.
        bytes_per_token, **kwargs: as :class:`LanguageModeling`.
    """

    def __init__(self, pretrained: str | None = None, config: dict[str, Any] | None = None, *, backend: str = "auto",
                 bias_update_rate: float = 0.0, dtype: str | None = None, gradient_checkpointing: bool = False,
                 bytes_per_token: float | None = None, **kwargs) -> None:
        from moezoo.zoo.hf import from_config, from_pretrained

        if (pretrained is None) == (config is None):
            raise ValueError(
                f"CausalLMFineTuning needs exactly one of pretrained=<folder or hub id> or config=<mapping with "
                f"model_type>, got pretrained={pretrained!r}, config={config!r}"
            )
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"CausalLMFineTuning: dtype must name a torch dtype such as 'bfloat16', got {dtype!r}")
        options = dict(backend=backend, bias_update_rate=bias_update_rate)
        if dtype is not None:
            options["dtype"] = getattr(torch, dtype)
        model = from_pretrained(pretrained, **options) if pretrained is not None else from_config(config, **options)
        if gradient_checkpointing:
            model.activation_checkpointing_enable()
        super().__init__(model, bytes_per_token, **kwargs)

    def logits(self, ids: Tensor) -> Tensor:
        # The task adds the auxiliary loss itself (aux_loss): transformers must not add it again.
        return self.model(input_ids=ids, use_cache=False, output_router_logits=False).logits
