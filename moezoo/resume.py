"""What makes an interrupted ``moezoo fit`` resume exactly where it stopped: the training data order
is a function of (seed, epoch), each process's share of it a function of its rank, the position
inside the epoch is saved in the checkpoint, and every process's random number generator states
travel with the checkpoint too."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["EpochShuffleSampler", "RNGStateCheckpoint", "ResumableDataLoader", "process_world"]


def process_world() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochShuffleSampler(DistributedSampler):
    """A random permutation per epoch drawn from ``(seed, epoch)`` with its own generator: the same
    on every run, unaffected by other uses of the global RNG, and restartable at any position.

    Under several processes each rank takes every ``world``-th sample of the permutation (the tail
    that does not divide evenly is dropped, so every rank runs the same number of batches). It is a
    ``DistributedSampler`` so that Lightning keeps it instead of substituting its own, which would
    lose the position; the world is read when iterating, so it can be built before the process
    group exists (hence no ``DistributedSampler.__init__``).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed = size, seed
        self.epoch = 0
        self.start = 0  # samples of this epoch this rank already consumed (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def __iter__(self):
        world, rank = process_world()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: len(self) * world][rank::world].tolist()
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.size // process_world()[0]


class ResumableDataLoader(DataLoader):
    """A shuffling training DataLoader whose place in the epoch goes into Lightning checkpoints
    (Lightning saves ``state_dict()`` of loaders that have one and calls ``load_state_dict`` on
    resume), so the resumed run continues with the very next batch instead of restarting the epoch.
    Skipped batches are never loaded, so collate-time randomness is not consumed twice."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, drop_last: bool = True,
                 sampler: Sampler | None = None, generator: torch.Generator | None = None, **kwargs) -> None:
        # A loader given another sampler (Lightning's, when a user's sampler is not distributed-aware)
        # still works, without exact mid-epoch resumption (state_dict is empty).
        # Its own generator: creating an iterator draws a worker base seed, which must not come from
        # the global generator, or a resumed run (one more iterator) would shift the global stream.
        super().__init__(dataset, batch_size=batch_size, sampler=sampler or EpochShuffleSampler(len(dataset), seed),
                         drop_last=drop_last, generator=generator or torch.Generator().manual_seed(seed), **kwargs)
        self.seed = seed
        self._consumed = 0

    @property
    def _resumable(self) -> bool:
        return isinstance(self.sampler, EpochShuffleSampler)

    def __iter__(self):
        self._consumed = self.sampler.start // self.batch_size if self._resumable else 0
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self._resumable:
            return {}
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._resumable and state:
            self.sampler.epoch = state["epoch"]
            self.sampler.start = state["consumed"] * self.batch_size


class RNGStateCheckpoint(Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) generator states of every process with
    every checkpoint and restores each process's own on resume, so router noise, dropout and
    augmentation continue the same streams. A checkpoint from another number of processes restores
    the first process's states everywhere."""

    @staticmethod
    def _own_state() -> dict:
        # Plain tensors and numbers only: checkpoints are read back with torch.load(weights_only=True).
        name, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict:
        world, _ = process_world()
        if world == 1:
            return {"ranks": [self._own_state()]}
        # Lightning collects callback states on every rank and rank 0 writes them: gather all.
        states: list = [None] * world
        dist.all_gather_object(states, self._own_state())
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        world, rank = process_world()
        ranks = state["ranks"]
        own = ranks[rank] if len(ranks) == world else ranks[0]
        random.setstate(own["python"])
        n = own["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(own["torch"])
        if "cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda"])
