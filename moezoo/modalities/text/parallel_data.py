"""``ParallelTextDataModule``: sentence pairs for translation — user-supplied TSV or JSONL files with the
user's tokenizer, or a built-in synthetic French-to-English date-range translation (no download)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from moezoo.checks import require_int
from moezoo.data import SplitDataModule

__all__ = ["ParallelTextDataModule", "TextCodec", "dates_pairs", "text_codec"]

_FR_MONTHS = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
              "novembre", "décembre")
_EN_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December")
#: Built-in split sizes and their seeds: each split is drawn from its own generator, and pairs seen in
#: an earlier split are skipped, so validation and test never repeat a training pair.
_DATES_SPLITS = {"train": (20000, 0), "val": (300, 1), "test": (300, 2)}


def _date(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)


def dates_pairs() -> dict[str, list[tuple[str, str]]]:
    """The built-in parallel corpus: French date ranges in two styles and their English translations,
    deterministic, e.g. ``"du 14/07/2023 au 02/01/2024"`` -> ``"from July 14, 2023 to January 2, 2024"``
    and ``"du 3 mars 1999 au 9 avril 2001"`` -> ``"from March 3, 1999 to April 9, 2001"``.

    A translation in miniature: words to map (du/au, month names), order to change (day and month),
    numbers to reformat (leading zeros). 20 000 training, 300 validation, 300 test pairs.
    """
    seen: set[str] = set()
    out = {}
    for split, (size, seed) in _DATES_SPLITS.items():
        rng = random.Random(seed)
        pairs = []
        while len(pairs) < size:
            (y1, m1, d1), (y2, m2, d2) = _date(rng), _date(rng)
            if rng.random() < 0.5:
                source = f"du {d1:02d}/{m1:02d}/{y1} au {d2:02d}/{m2:02d}/{y2}"
            else:
                source = f"du {d1} {_FR_MONTHS[m1 - 1]} {y1} au {d2} {_FR_MONTHS[m2 - 1]} {y2}"
            if source in seen:
                continue
            seen.add(source)
            pairs.append((source, f"from {_EN_MONTHS[m1 - 1]} {d1}, {y1} to {_EN_MONTHS[m2 - 1]} {d2}, {y2}"))
        out[split] = pairs
    return out


@dataclass
class TextCodec:
    """A tokenizer for translation: ``encode(text) -> ids``, ``decode(ids) -> text``, and three special
    tokens appended after its vocabulary of ``size``: padding, beginning and end of sentence."""

    encode: Callable[[str], list[int]]
    decode_ids: Callable[[list[int]], str]
    size: int

    @property
    def pad_id(self) -> int:
        return self.size

    @property
    def bos_id(self) -> int:
        return self.size + 1

    @property
    def eos_id(self) -> int:
        return self.size + 2

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's and the three special tokens."""
        return self.size + 3

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first end of sentence, special tokens left out."""
        kept = []
        for i in ids:
            if i == self.eos_id:
                break
            if i < self.size:
                kept.append(int(i))
        return self.decode_ids(kept)


def text_codec(name: str) -> TextCodec:
    """``"bytes"``: UTF-8 bytes (256 ids, undecodable bytes replaced); anything else:
    ``transformers.AutoTokenizer.from_pretrained(name)`` (a local folder or a cached hub id), without
    its own special tokens."""
    if name == "bytes":
        return TextCodec(lambda t: list(t.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", "replace"), 256)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    return TextCodec(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                     lambda ids: tokenizer.decode(ids, skip_special_tokens=True), len(tokenizer))


class PairDataset(Dataset):
    """Encoded (source ids, target ids) pairs."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.pairs[index]


class ParallelTextDataModule(SplitDataModule):
    """Sentence pairs for :class:`~moezoo.modalities.text.translation.Translation`.

    Batches are dicts: ``source`` (B, S) ids, ``target_in`` (B, T) = beginning-of-sentence + target,
    ``target_out`` (B, T) = target + end-of-sentence, padded with ``pad_id``; ``references``, the
    target texts (for BLEU).

    Args:
        dataset: ``"dates"`` (built in, :func:`dates_pairs`), ``"tsv"`` (``source<TAB>target`` per
            line) or ``"jsonl"`` (one object per line with ``source_field`` and ``target_field``).
        train_file, val_file, test_file: the files of ``tsv``/``jsonl`` (test defaults to val).
        tokenizer: see :func:`text_codec` (default ``"bytes"``); one joined vocabulary for both sides.
        max_source_length, max_target_length: truncate longer sequences (in tokens).
        batch_size, eval_batch_size, num_workers, seed: loaders.
    """

    def __init__(
        self,
        dataset: str = "dates",
        tokenizer: str = "bytes",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        *,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        source_field: str = "source",
        target_field: str = "target",
        max_source_length: int = 256,
        max_target_length: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if dataset not in ("dates", "tsv", "jsonl"):
            raise ValueError(f"{name}: dataset must be 'dates', 'tsv' or 'jsonl', got {dataset!r}")
        if dataset != "dates" and not (train_file and val_file):
            raise ValueError(f"{name}: dataset={dataset!r} needs train_file and val_file")
        for field, value in (("batch_size", batch_size), ("max_source_length", max_source_length),
                             ("max_target_length", max_target_length)):
            require_int(name, field, value)
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.files = {"train": train_file, "val": val_file, "test": test_file or val_file}
        self.source_field, self.target_field = source_field, target_field
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.num_workers, self.seed = num_workers, seed
        self._codec: TextCodec | None = None
        self.texts: dict[str, list[tuple[str, str]]] = {}
        self.encoded: dict[str, PairDataset] = {}
        self.save_hyperparameters()

    @property
    def codec(self) -> TextCodec:
        if self._codec is None:
            self._codec = text_codec(self.tokenizer)
        return self._codec

    # The model and task read these (the special tokens follow the tokenizer's vocabulary).
    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def pad_id(self) -> int:
        return self.codec.pad_id

    @property
    def bos_id(self) -> int:
        return self.codec.bos_id

    @property
    def eos_id(self) -> int:
        return self.codec.eos_id

    def _read(self, path: str) -> list[tuple[str, str]]:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{type(self).__name__}: {file} is not a file")
        pairs = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if self.dataset == "tsv":
                fields = line.split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{file}:{number}: expected 'source<TAB>target', got {len(fields)} fields")
                pairs.append((fields[0], fields[1]))
            else:
                record = json.loads(line)
                pairs.append((record[self.source_field], record[self.target_field]))
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.encoded:
            return
        self.texts = dates_pairs() if self.dataset == "dates" else {s: self._read(f) for s, f in self.files.items()}
        for split, pairs in self.texts.items():
            if not pairs:
                raise ValueError(f"{type(self).__name__}: the {split} split has no sentence pairs")
            self.encoded[split] = PairDataset([(self.codec.encode(s)[: self.max_source_length],
                                                self.codec.encode(t)[: self.max_target_length - 1])
                                               for s, t in pairs])

    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        # The target texts travel with the pairs: BLEU compares generated text with them.
        return _Indexed(self.encoded[split], [t for _, t in self.texts[split]])

    def collate_for(self, train: bool) -> Callable:
        return self.collate

    def collate(self, items: list[tuple[list[int], list[int], str]]) -> dict:
        """Pad a list of (source ids, target ids, reference text) into a batch dict."""
        codec = self.codec

        def pad(rows: list[list[int]]) -> Tensor:
            out = torch.full((len(rows), max(len(r) for r in rows)), codec.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            return out

        return {"source": pad([s for s, _, _ in items]),
                "target_in": pad([[codec.bos_id, *t] for _, t, _ in items]),
                "target_out": pad([[*t, codec.eos_id] for _, t, _ in items]),
                "references": [r for _, _, r in items]}

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (up to the end of sentence)."""
        return self.codec.decode(ids)


class _Indexed(Dataset):
    """(source ids, target ids, target text) items."""

    def __init__(self, pairs: PairDataset, references: list[str]) -> None:
        self.pairs, self.references = pairs, references

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], str]:
        source, target = self.pairs[index]
        return source, target, self.references[index]
