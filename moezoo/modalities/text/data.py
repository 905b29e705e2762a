"""``TextDataModule``: a built-in byte-level corpus (no download), text files and ``datasets`` corpora on disk.

Text is tokenised once into one id stream per split (documents joined by a blank line) and cut into
windows of ``context_length + 1`` ids (inputs and next-token targets); training windows are
shuffled, evaluation windows are the split's consecutive, non-overlapping windows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from moezoo.checks import import_extra
from moezoo.data import SplitDataModule

__all__ = ["BYTE_VOCAB_SIZE", "TextDataModule", "Windows", "load_tokenizer", "pydoc_topics_splits"]

BYTE_VOCAB_SIZE = 256
_SPLITS = ("train", "val", "test")
_SEPARATOR = "\n\n"


def pydoc_topics_splits() -> dict[str, list[str]]:
    """The built-in corpus: CPython's ``pydoc_data.topics`` (79 topics, ~465 k characters of English
    technical prose, PSF licence), present in every CPython, so nothing is downloaded.

    Fixed split by topic: topics sorted by name, every 10th from the 4th (index 3, 13, 23, ...) is
    validation (8 topics, 67.6 k bytes on CPython 3.11: 15 %), the rest training (398 k bytes); the
    test split is the validation split (the corpus is too small for three). The topics text changes
    with the CPython minor version, so figures are comparable within one version only.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    val = [topics[n] for i, n in enumerate(names) if i % 10 == 3]
    train = [topics[n] for i, n in enumerate(names) if i % 10 != 3]
    return {"train": train, "val": val, "test": val}


def load_tokenizer(name: str) -> tuple[Callable[[str], list[int]], int]:
    """``(encode, vocab_size)`` for ``name``.

    ``"bytes"``: UTF-8 bytes, vocabulary 256 (the default, no dependency). Anything else is loaded
    with ``transformers.AutoTokenizer.from_pretrained(name)`` (a local folder, or a hub id already
    in the cache; honours ``HF_HUB_OFFLINE``); ``"byt5"`` is transformers' ``ByT5Tokenizer``
    (byte-level with special tokens, built without files).
    """
    if name == "bytes":
        return (lambda text: list(text.encode("utf-8"))), BYTE_VOCAB_SIZE
    tokenizer = _transformers_tokenizer(name)
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]), len(tokenizer)


@functools.lru_cache(maxsize=4)
def _transformers_tokenizer(name: str):
    """The transformers tokenizer ``name`` (see :func:`load_tokenizer`), loaded once per process."""
    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class Windows(Dataset):
    """Consecutive, non-overlapping windows of ``length`` ids of a 1-d id stream (the tail that does
    not fill a window is dropped); ``offset`` shifts where the first window starts."""

    def __init__(self, ids: Tensor, length: int, offset: int = 0) -> None:
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-d, got shape {tuple(ids.shape)}")
        self.ids, self.length, self.offset = ids, length, offset
        self.count = max((ids.numel() - offset) // length, 0)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        start = self.offset + index * self.length
        return self.ids[start : start + self.length].long()


class TextDataModule(SplitDataModule):
    """Token windows for :class:`~moezoo.modalities.text.LanguageModeling`.

    Each item is (context_length + 1,) int64 ids: the model reads the first ``context_length`` and
    predicts the last ``context_length``.

    Args:
        dataset: ``"pydoc_topics"`` (built in, offline, see :func:`pydoc_topics_splits`);
            ``"files"``: ``train_files`` and ``val_files`` (``test_files`` optional; without
            ``val_files`` the last ``val_fraction`` of each training file is held out), plain text,
            or JSON lines (``.jsonl``: one document per line, its ``text_field``, or with
            ``chat_template`` its ``messages`` rendered by the tokenizer's chat template);
            ``"hf:<path or name>"``: a ``datasets`` corpus, ``load_from_disk(path)`` for a
            saved dataset folder, else ``load_dataset(name, hf_config)`` (local files or the HF
            cache; nothing is downloaded when ``HF_DATASETS_OFFLINE=1``), with splits ``hf_splits``
            and the text in column ``text_field``.
        tokenizer: see :func:`load_tokenizer` (default ``"bytes"``); a transformers model's own
            tokenizer by its folder or hub id.
        chat_template: render JSON-lines records' ``messages`` (a list of ``{"role", "content"}``)
            with the tokenizer's chat template (a transformers tokenizer that has one).
        context_length: tokens the model sees per window.
        batch_size, eval_batch_size: batch sizes.
        max_documents: use at most this many documents per split (large corpora such as C4).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str = "pydoc_topics",
        tokenizer: str = "bytes",
        context_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        *,
        train_files: Sequence[str] | None = None,
        val_files: Sequence[str] | None = None,
        test_files: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        hf_config: str | None = None,
        hf_splits: dict[str, str] | None = None,
        text_field: str = "text",
        chat_template: bool = False,
        max_documents: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in ("pydoc_topics", "files") and not dataset.startswith("hf:"):
            raise ValueError(f"dataset must be 'pydoc_topics', 'files' or 'hf:<path or name>', got {dataset!r}")
        if dataset == "files" and not train_files:
            raise ValueError("dataset='files' needs train_files=[...]")
        for name, value in (("context_length", context_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if chat_template and tokenizer == "bytes":
            raise ValueError("chat_template=True needs a transformers tokenizer with a chat template, got tokenizer='bytes'")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.context_length, self.batch_size = context_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_files, self.val_files, self.test_files = train_files, val_files, test_files
        self.val_fraction, self.hf_config, self.text_field = val_fraction, hf_config, text_field
        self.chat_template = chat_template
        self.hf_splits = dict(hf_splits or {"train": "train", "val": "validation", "test": "test"})
        self.max_documents, self.num_workers = max_documents, num_workers
        self.ids: dict[str, Tensor] = {}
        self.bytes: dict[str, int] = {}
        self._vocab_size: int | None = None
        self.save_hyperparameters()

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._vocab_size = load_tokenizer(self.tokenizer)[1]
        return self._vocab_size

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token of ``split`` (1.0 for the byte tokenizer), for bits per byte."""
        self.setup()
        return self.bytes[split] / max(self.ids[split].numel(), 1)

    # -- reading ---------------------------------------------------------------------------------
    def _documents(self) -> dict[str, list[str]]:
        if self.dataset == "pydoc_topics":
            return pydoc_topics_splits()
        if self.dataset == "files":
            return self._files()
        return self._hf()

    def _files(self) -> dict[str, list[str]]:
        def read(paths: Sequence[str]) -> list[str]:
            texts = []
            for p in paths:
                path = Path(p).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"TextDataModule: {path} is not a file")
                text = path.read_text(encoding="utf-8")
                if path.suffix == ".jsonl":  # one document per record, the whole file one text
                    text = _SEPARATOR.join(self._record_text(json.loads(line), path, n)
                                           for n, line in enumerate(text.splitlines(), 1) if line.strip())
                texts.append(text)
            return texts

        train = read(self.train_files)
        if self.val_files:
            val = read(self.val_files)
        else:  # hold out the tail of every training file
            cut = [int(len(t) * (1.0 - self.val_fraction)) for t in train]
            val = [t[c:] for t, c in zip(train, cut)]
            train = [t[:c] for t, c in zip(train, cut)]
        test = read(self.test_files) if self.test_files else val
        return {"train": train, "val": val, "test": test}

    def _record_text(self, record: object, path: Path, line: int) -> str:
        """One JSON-lines record's text: its ``text_field``, or its chat rendered by the template."""
        if self.chat_template:
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"TextDataModule: {path}:{line} has no 'messages' list for the chat template")
            return _transformers_tokenizer(self.tokenizer).apply_chat_template(record["messages"], tokenize=False)
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            raise ValueError(f"TextDataModule: {path}:{line} has no string field {self.text_field!r}")
        return record[self.text_field]

    def _hf(self) -> dict[str, list[str]]:
        datasets = import_extra("datasets", "text")
        source = self.dataset.split(":", 1)[1]
        if Path(source).expanduser().is_dir() and (Path(source).expanduser() / "dataset_dict.json").is_file():
            corpus = datasets.load_from_disk(str(Path(source).expanduser()))
        else:
            corpus = datasets.load_dataset(source, self.hf_config)
        out = {}
        for split, name in self.hf_splits.items():
            if split == "test" and name not in corpus:
                continue  # no test split: the validation split serves
            if name not in corpus:
                raise ValueError(f"TextDataModule: the corpus has no split {name!r}; it has {sorted(corpus)}")
            column = corpus[name]
            if self.max_documents is not None:
                column = column.select(range(min(self.max_documents, len(column))))
            out[split] = column[self.text_field]
        out.setdefault("test", out["val"])
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.ids:
            return
        encode, self._vocab_size = load_tokenizer(self.tokenizer)
        for split, docs in self._documents().items():
            if self.max_documents is not None:
                docs = docs[: self.max_documents]
            text = _SEPARATOR.join(docs)
            ids = torch.tensor(encode(text), dtype=torch.int32)
            if ids.numel() < self.context_length + 1:
                raise ValueError(
                    f"TextDataModule: the {split} split has {ids.numel()} tokens, fewer than context_length + 1 = "
                    f"{self.context_length + 1}"
                )
            self.ids[split] = ids
            self.bytes[split] = len(text.encode("utf-8"))

    # -- loaders ---------------------------------------------------------------------------------
    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        return Windows(self.ids[split], self.context_length + 1)




