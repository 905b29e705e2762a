"""Segment-level recurrence (Transformer-XL): batches whose row b continues row b of the previous batch,
and the language-modelling task that resets the LM's segment memory where the streams restart.

As the SwitchHead/σ-MoE authors' training code (RobertCsordas/moe_attention
``framework/loader/sampler.py``, ``MultibatchSequentialSampler``; ``interfaces/language_model_interface.py``;
``tasks/simple/language_model/enwik8_transformer.py``): the split's id stream is cut into segments of
T + 1 ids starting every T ids (segment p's last target is segment p+1's first input), the segments
are divided into B contiguous streams of ``n // B`` segments, and step p's batch holds segment p of
every stream. The training memory is reset at every epoch (the streams start over), evaluation starts
from an empty memory (:class:`~moezoo.modalities.text.TransformerLM` does that in ``eval()``).
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from moezoo.modalities.text.data import TextDataModule, Windows
from moezoo.modalities.text.task import LanguageModeling
from moezoo.resume import EpochShuffleSampler, ResumableDataLoader, process_world

__all__ = ["SegmentLanguageModeling", "SegmentSampler", "SegmentTextDataModule", "Segments"]


class Segments(Windows):
    """Segments of ``tokens + 1`` ids of a 1-d id stream starting every ``tokens`` ids: consecutive
    segments chain (the tail that does not fill one is dropped)."""

    def __init__(self, ids: Tensor, tokens: int) -> None:
        super().__init__(ids, tokens + 1)
        self.stride = tokens
        self.count = max((ids.numel() - 1) // tokens, 0)

    def __getitem__(self, index: int) -> Tensor:
        start = index * self.stride
        return self.ids[start : start + self.length].long()


class SegmentSampler(EpochShuffleSampler):
    """Segment indices in stream order for batches of ``streams`` rows per process.

    The ``size`` segments form ``streams * world`` contiguous streams of ``size // (streams * world)``
    segments (the rest is dropped); process r owns streams ``r * streams ... (r + 1) * streams - 1``
    (the reference's ``get_work_slice`` with the per-process batch moezoo uses); the order is step
    by step, stream by stream, so a loader with ``batch_size=streams`` yields step p's segment of every
    stream. No shuffling: the epoch only resets the position. An
    :class:`~moezoo.resume.EpochShuffleSampler`, so a :class:`~moezoo.resume.ResumableDataLoader`
    resumes it mid-epoch and Lightning keeps it under several processes.
    """

    def __init__(self, size: int, streams: int) -> None:
        super().__init__(size)
        self.streams = streams

    def steps(self) -> int:
        """Batches per epoch: the segments per stream."""
        return self.size // (self.streams * process_world()[0])

    def __iter__(self):
        _, rank = process_world()
        steps = self.steps()
        first = rank * self.streams
        order = [b * steps + p for p in range(steps) for b in range(first, first + self.streams)]
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.steps() * self.streams


class SegmentTextDataModule(TextDataModule):
    """:class:`~moezoo.modalities.text.TextDataModule` for LMs with segment memory: every loader
    (training and evaluation) yields batches of consecutive segments, row b of a batch continuing
    row b of the previous one (:class:`SegmentSampler`); ``batch_size`` (``eval_batch_size``) is the
    number of streams per process. Same arguments as ``TextDataModule``.

    With B streams an epoch is ``segments // B`` steps and the last ``segments % B`` segments of a
    split are not used, as in the reference; every stream's first segment has no memory.
    """

    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        return Segments(self.ids[split], self.context_length)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset_for(split)
        streams = self.batch_size if train else self.eval_batch_size
        sampler = SegmentSampler(len(dataset), streams)
        if sampler.steps() == 0:
            raise ValueError(f"SegmentTextDataModule: the {split} split has {len(dataset)} segments of "
                             f"{self.context_length} tokens, fewer than its {streams * process_world()[0]} streams")
        common = dict(num_workers=self.num_workers, collate_fn=self.collate_for(train),
                      persistent_workers=self.num_workers > 0)
        if train:
            return ResumableDataLoader(dataset, batch_size=streams, seed=self.seed, sampler=sampler, **common)
        return DataLoader(dataset, batch_size=streams, sampler=sampler, drop_last=True, **common)


class SegmentLanguageModeling(LanguageModeling):
    """:class:`~moezoo.modalities.text.LanguageModeling` for an LM with segment memory (a
    :class:`~moezoo.modalities.text.TransformerLM` with ``memory_length > 0``) trained on
    :class:`SegmentTextDataModule` batches: the memory is emptied at the start of every training
    epoch, when the streams start over (the reference's ``start_next_epoch``). Memory is not saved in
    checkpoints (as the reference's default): a resumed run starts its first step without one.
    Same arguments as ``LanguageModeling``."""

    def on_train_epoch_start(self) -> None:
        self.model.reset_memory()
