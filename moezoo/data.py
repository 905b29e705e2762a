"""What the built-in data modules share: one dataset per split, a resumable shuffling training
loader, order-keeping evaluation loaders."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset

from moezoo.resume import ResumableDataLoader

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """Base of the built-in ``LightningDataModule`` s.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``num_workers`` (and ``seed``, the shuffling
    seed) and implement :meth:`dataset_for`; :meth:`collate_for` is optional. Training batches come
    from a :class:`~moezoo.resume.ResumableDataLoader` (shuffled per epoch from the seed, incomplete
    batches dropped, exact mid-epoch resumption); validation, test and predict keep the split's order
    (predict reads the test split).
    """

    batch_size: int
    eval_batch_size: int
    num_workers: int = 0
    seed: int = 0

    def dataset_for(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def collate_for(self, train: bool) -> Callable | None:
        """The collate function of training or evaluation batches (None: PyTorch's default)."""
        return None

    def _loader(self, split: str, train: bool) -> DataLoader:
        common = dict(num_workers=self.num_workers, collate_fn=self.collate_for(train),
                      persistent_workers=self.num_workers > 0)
        if train:
            return ResumableDataLoader(self.dataset_for(split), batch_size=self.batch_size, seed=self.seed, **common)
        return DataLoader(self.dataset_for(split), batch_size=self.eval_batch_size, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
