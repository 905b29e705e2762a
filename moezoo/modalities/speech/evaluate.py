"""Greedy CTC decoding, character error rate, and the evaluation behind the speech model cards."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moezoo.layers.routed import routed_layers

__all__ = [
    "character_error_rate",
    "edit_distance",
    "evaluate_espeak_heldout",
    "evaluate_keywords_heldout",
    "evaluate_speech",
    "greedy_ctc_decode",
]


def greedy_ctc_decode(logits: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: the most likely symbol per frame, repeats merged, then blanks removed.

    Args:
        logits: (batch, frames, symbols) scores (logits, log-probabilities or posteriors).
        lengths: (batch,) valid frames.
        blank: the blank symbol.

    Returns:
        One label sequence per utterance.
    """
    best = logits.argmax(dim=-1).cpu()
    out = []
    for row, length in zip(best, lengths.cpu().tolist()):
        path = row[:length]
        if path.numel():
            keep = torch.ones_like(path, dtype=torch.bool)
            keep[1:] = path[1:] != path[:-1]
            path = path[keep]
        out.append([int(s) for s in path if int(s) != blank])
    return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions and deletions all cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def character_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus CER: total character edits over total reference characters (spaces count)."""
    if len(refs) != len(hyps):
        raise ValueError(f"character_error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    chars = sum(len(r) for r in refs)
    if chars == 0:
        raise ValueError("character_error_rate: the references are empty")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / chars


@torch.no_grad()
def evaluate_speech(model: nn.Module, datamodule, split: str = "test") -> dict[str, float]:
    """CER (greedy CTC decoding), keyword accuracy (if the model has a keyword head), and the mean
    per-layer routing entropy and largest expert share of ``model`` on ``split`` of ``datamodule``."""
    from moezoo.modalities.speech.data import CharTokenizer

    loader = {"test": datamodule.test_dataloader, "val": datamodule.val_dataloader}[split]()
    tokenizer = CharTokenizer()
    model.eval()
    refs, hyps, correct, labelled = [], [], 0, 0
    load, entropy = [], []
    for batch in loader:
        out = model(batch["features"], batch["lengths"])
        hyps += [tokenizer.decode(ids) for ids in greedy_ctc_decode(out.logits, out.lengths)]
        refs += [tokenizer.normalize(t) for t in batch["text"]]
        if out.keyword_logits is not None:
            known = batch["keyword"] >= 0
            correct += int((out.keyword_logits.argmax(-1)[known] == batch["keyword"][known]).sum())
            labelled += int(known.sum())
        for _, layer in routed_layers(model):
            stats = layer.last_stats
            if "tokens_per_expert" in stats:
                counts = stats["tokens_per_expert"]
                load.append(float(counts.max() / counts.sum().clamp_min(1)))
                entropy.append(float(stats["entropy"]))
    result: dict[str, float] = {"cer": character_error_rate(refs, hyps), "examples": len(refs)}
    if labelled:
        result["keyword_accuracy"] = correct / labelled
    if load:
        result["max_expert_share"] = sum(load) / len(load)
        result["router_entropy"] = sum(entropy) / len(entropy)
    return result


def evaluate_espeak_heldout(model: nn.Module) -> dict[str, float]:
    """:func:`evaluate_speech` on the built-in eSpeak test split (300 utterances by 15 voice variants
    never heard in training; digit strings and command phrases; seed 0; 40-dim Kaldi fbank)."""
    from moezoo.modalities.speech.data import SpeechDataModule

    return evaluate_speech(model, SpeechDataModule("espeak", num_mel_bins=model.input_dim, eval_batch_size=50), "test")


def evaluate_keywords_heldout(model: nn.Module) -> dict[str, float]:
    """:func:`evaluate_speech` on the built-in single-keyword test split (held-out voices, seed 0)."""
    from moezoo.modalities.speech.data import SpeechDataModule

    data = SpeechDataModule("espeak", transcripts="keywords", num_mel_bins=model.input_dim, eval_batch_size=50)
    return evaluate_speech(model, data, "test")
