"""``Translation``: the MoA paper's objective (label-smoothed cross-entropy plus MoA's losses, as its
``moa_ce_loss`` criterion) and BLEU of greedy translations (sacrebleu)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from moezoo.checks import import_extra, require_float
from moezoo.modalities.text.task import pop_split_nll
from moezoo.task import MoETask

__all__ = ["Translation", "label_smoothed_nll_loss"]


def label_smoothed_nll_loss(logits: Tensor, target: Tensor, epsilon: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """fairseq's ``label_smoothed_nll_loss`` (the MoA reference's ``moa_loss.py``), summed over the
    non-padding tokens: ``(1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v)`` with ``eps_i = eps / (V - 1)``
    (not PyTorch's ``label_smoothing``, which spreads eps over all V classes).

    Args:
        logits: (..., V); target: (...) ids; ignore_index: the padding id.

    Returns:
        (smoothed loss sum, nll sum), 0-dim each.
    """
    lprobs = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    target = target.reshape(-1, 1)
    keep = target.ne(ignore_index)
    nll = -lprobs.gather(-1, target).masked_fill(~keep, 0.0).sum()
    smooth = -lprobs.sum(-1, keepdim=True).masked_fill(~keep, 0.0).sum()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


class Translation(MoETask):
    """Sequence-to-sequence translation with a model ``(source, target_in) -> logits`` and a
    ``generate(source, bos, eos, max_length)`` method (:class:`~moezoo.modalities.text.seq2seq.MoATransformer`),
    on :class:`~moezoo.modalities.text.parallel_data.ParallelTextDataModule` batches.

    Objective, as the reference's criterion: ``(label-smoothed loss summed over the target tokens +
    the weighted MoA losses) / target tokens``: the MoA losses are added to the *token-summed* loss,
    so their effective weight is their coefficient divided by the tokens per batch. Logs
    ``{stage}/loss`` (that objective without the MoA losses), ``{stage}/nll`` (per token, nats),
    per validation/test epoch ``{stage}/ppl`` and ``{stage}/bleu``: sacrebleu's corpus BLEU
    (``tokenize``, default "13a") of the greedy translations (at most ``max_length`` tokens, default
    the reference length + 10 per batch) against the target texts. The paper reports tokenised
    BLEU with compound splitting (``multi-bleu.perl``) of beam-4 translations of averaged checkpoints.
    Under several processes BLEU is each process's own share of the split (not gathered).

    Args:
        model: the translation model.
        label_smoothing: eps (the paper: 0.1).
        max_length: generation length limit (None: the batch's longest target + 10).
        bleu_tokenize: sacrebleu's tokenizer.
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.1, max_length: int | None = None,
                 bleu_tokenize: str = "13a", **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.label_smoothing = require_float("Translation", "label_smoothing", label_smoothing, below=1.0)
        self.max_length, self.bleu_tokenize = max_length, bleu_tokenize
        self.nll = nn.ModuleDict({s: MeanMetric() for s in ("val_", "test_")})
        self.hypotheses: list[str] = []
        self.references: list[str] = []

    def _datamodule(self):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "decode"):
            raise RuntimeError("Translation needs a ParallelTextDataModule (special token ids, decoding)")
        return datamodule

    def step(self, batch: dict, stage: str) -> tuple[Tensor, int]:
        datamodule = self._datamodule()
        logits = self.model(batch["source"], batch["target_in"])
        smoothed, nll = label_smoothed_nll_loss(logits, batch["target_out"], self.label_smoothing, datamodule.pad_id)
        tokens = int(batch["target_out"].ne(datamodule.pad_id).sum())
        loss = smoothed / tokens
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=tokens)
        self.log(f"{stage}/nll", nll.detach() / tokens, on_step=False, on_epoch=True, batch_size=tokens)
        if stage != "train":
            self.nll[stage + "_"].update(nll.detach() / tokens, weight=tokens)
            limit = self.max_length or batch["target_out"].shape[1] + 10
            generated = self.model.generate(batch["source"], datamodule.bos_id, datamodule.eos_id, limit)
            self.hypotheses += [datamodule.decode(row.tolist()) for row in generated]
            self.references += list(batch["references"])
        return loss, tokens

    def add_aux_loss(self, main_loss: Tensor, stage: str, batch_size: int | None = None) -> Tensor | None:
        # The reference adds MoA's losses to the token-summed loss before dividing by the tokens.
        total = super().add_aux_loss(main_loss * batch_size, stage, batch_size)
        return None if total is None else total / batch_size

    def _epoch_end(self, stage: str) -> None:
        nll = pop_split_nll(self.nll[stage + "_"])
        if nll is None:
            return
        self.log(f"{stage}/ppl", torch.exp(nll))
        sacrebleu = import_extra("sacrebleu", "text")
        bleu = sacrebleu.corpus_bleu(self.hypotheses, [self.references], tokenize=self.bleu_tokenize).score
        self.log(f"{stage}/bleu", bleu, prog_bar=stage == "val")
        self.hypotheses, self.references = [], []

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """Greedy translations of the batch's sources, as text."""
        datamodule = self._datamodule()
        limit = self.max_length or 2 * batch["source"].shape[1] + 10
        generated = self.model.generate(batch["source"], datamodule.bos_id, datamodule.eos_id, limit)
        return [datamodule.decode(row.tolist()) for row in generated]

