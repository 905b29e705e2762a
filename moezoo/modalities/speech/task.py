"""``SpeechRecognition``: CTC (+ the embedding network's CTC, keyword and SpeechMoE2 classifier losses)
plus the weighted routing losses; greedy decoding and character error rate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.text import CharErrorRate

from moezoo.modalities.speech.data import CharTokenizer
from moezoo.modalities.speech.evaluate import greedy_ctc_decode
from moezoo.task import MoETask

__all__ = ["SpeechRecognition", "ctc_loss"]

_STAGES = ("train", "val", "test")


def ctc_loss(logits: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int = 0) -> Tensor:
    """CTC loss summed over utterances and divided by the batch size (as the SpeechMoE authors' code).

    Args:
        logits: (batch, frames, symbols); lengths: (batch,) valid frames.
        targets: (batch, labels) padded; target_lengths: (batch,).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    loss = F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank, reduction="sum", zero_infinity=True)
    return loss / logits.shape[0]


class SpeechRecognition(MoETask):
    """Speech recognition with :class:`~moezoo.modalities.speech.SpeechMoE` (or any model returning a
    :class:`~moezoo.modalities.speech.SpeechOutput`).

    Objective: ``ctc_weight * L_ctc + embedding_ctc_weight * L_emb + keyword_weight * CE_keyword
    + global_weight * sum CE_global + sum_layers (alpha L_s + beta L_m)``; the last term comes from the
    MoE layers' ``aux_loss_weights`` (or ``aux_loss_weights`` here, see :class:`~moezoo.task.MoETask`).

    Args:
        model: the acoustic model.
        ctc_weight: weight of the main CTC loss; 0 trains a keyword classifier alone.
        embedding_ctc_weight: gamma, the shared embedding network's CTC loss (the authors' 3M-ASR
            config: 0.01; the paper's value is not verified). With a detached embedding it is the
            embedding network's only CTC signal, and Adam makes its scale matter little.
        keyword_weight: cross-entropy of the keyword head on labelled utterances.
        global_weight: cross-entropy of SpeechMoE2's domain/accent classifiers on labelled utterances.
        **kwargs: optimiser and logging settings of :class:`~moezoo.task.MoETask`.
    """

    def __init__(
        self,
        model: nn.Module,
        ctc_weight: float = 1.0,
        embedding_ctc_weight: float = 0.01,
        keyword_weight: float = 0.0,
        global_weight: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        for name, value in (("ctc_weight", ctc_weight), ("embedding_ctc_weight", embedding_ctc_weight),
                            ("keyword_weight", keyword_weight), ("global_weight", global_weight)):
            if value < 0:
                raise ValueError(f"SpeechRecognition: {name} must be >= 0, got {value}")
        if keyword_weight > 0 and getattr(model, "keyword_head", None) is None:
            raise ValueError(
                "SpeechRecognition: keyword_weight > 0 needs a model with a keyword head (num_keywords > 0)"
            )
        if ctc_weight == 0 and keyword_weight == 0:
            raise ValueError("SpeechRecognition: ctc_weight and keyword_weight are both 0: nothing to learn")
        self.ctc_weight, self.embedding_ctc_weight = ctc_weight, embedding_ctc_weight
        self.keyword_weight, self.global_weight = keyword_weight, global_weight
        self.tokenizer = CharTokenizer()
        # ModuleDict keys may not shadow nn.Module attributes ("train").
        self.cer = nn.ModuleDict({f"{s}_": CharErrorRate() for s in _STAGES})

    def _classification(self, logits: Tensor | None, labels: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Cross-entropy and accuracy over utterances with a label (>= 0), or (None, None)."""
        if logits is None:
            return None, None
        known = labels >= 0
        if not bool(known.any()):
            return None, None
        logits, labels = logits[known], labels[known]
        return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean()

    def step(self, batch: dict, stage: str) -> tuple[Tensor, int]:
        batch_size = batch["features"].shape[0]
        out = self.model(batch["features"], batch["lengths"])
        log = dict(on_step=stage == "train", on_epoch=True, batch_size=batch_size)
        ctc = ctc_loss(out.logits, out.lengths, batch["targets"], batch["target_lengths"])
        loss = self.ctc_weight * ctc
        self.log(f"{stage}/ctc", ctc.detach(), prog_bar=True, **log)
        if out.embed_logits is not None and self.embedding_ctc_weight > 0:
            embed_ctc = ctc_loss(out.embed_logits, out.lengths, batch["targets"], batch["target_lengths"])
            loss = loss + self.embedding_ctc_weight * embed_ctc
            self.log(f"{stage}/embedding_ctc", embed_ctc.detach(), **log)
        ce, acc = self._classification(out.keyword_logits, batch["keyword"])
        if ce is not None:
            loss = loss + self.keyword_weight * ce
            self.log(f"{stage}/keyword_acc", acc, prog_bar=True, **log)
        for name, logits in out.global_logits.items():
            ce, acc = self._classification(logits, batch.get(name, torch.full_like(batch["lengths"], -1)))
            if ce is not None:
                loss = loss + self.global_weight * ce
                self.log(f"{stage}/{name}_acc", acc, **log)
        if stage != "train" and self.ctc_weight > 0:
            hyps = [self.tokenizer.decode(ids) for ids in greedy_ctc_decode(out.logits, out.lengths)]
            refs = [self.tokenizer.normalize(t) for t in batch["text"]]
            self.cer[stage + "_"](hyps, refs)
            self.log(f"{stage}/cer", self.cer[stage + "_"], prog_bar=True, on_step=False, on_epoch=True,
                     batch_size=batch_size)
        self.log(f"{stage}/loss", loss.detach(), **log)
        return loss, batch_size

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        out = self.model(batch["features"], batch["lengths"])
        return [self.tokenizer.decode(ids) for ids in greedy_ctc_decode(out.logits, out.lengths)]
