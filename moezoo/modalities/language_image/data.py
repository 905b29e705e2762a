"""Image-text pairs: a built-in captioned glyph set (no download), CSV/JSONL pairs for real use, and
the word-level tokenizer built from the captions with ``tokenizers``."""

from __future__ import annotations

import csv
import json
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from moezoo.data import SplitDataModule

__all__ = [
    "GLYPH_FONTS",
    "ImageTextDataModule",
    "build_tokenizer",
    "class_prompts",
    "render_glyphs",
]

#: The 21 text fonts that ship with matplotlib: file -> (family words, style words).
GLYPH_FONTS = {
    **{f"DejaVuSans{s}.ttf": ("dejavu sans", w) for s, w in (("", "regular"), ("-Bold", "bold"),
                                                              ("-Oblique", "italic"), ("-BoldOblique", "bold italic"))},
    **{f"DejaVuSansMono{s}.ttf": ("dejavu sans mono", w) for s, w in (("", "regular"), ("-Bold", "bold"),
                                                                       ("-Oblique", "italic"),
                                                                       ("-BoldOblique", "bold italic"))},
    **{f"DejaVuSerif{s}.ttf": ("dejavu serif", w) for s, w in (("", "regular"), ("-Bold", "bold"),
                                                                ("-Italic", "italic"), ("-BoldItalic", "bold italic"))},
    **{f"STIXGeneral{s}.ttf": ("stix", w) for s, w in (("", "regular"), ("Bol", "bold"), ("Italic", "italic"),
                                                        ("BolIta", "bold italic"))},
    "cmr10.ttf": ("computer modern", "regular"),
    "cmb10.ttf": ("computer modern", "bold"),
    "cmti10.ttf": ("computer modern", "italic"),
    "cmss10.ttf": ("computer modern sans", "regular"),
    "cmtt10.ttf": ("computer modern typewriter", "regular"),
}
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase
SPECIAL_TOKENS = ("[PAD]", "[UNK]")


def _describe(ch: str) -> str:
    if ch.isdigit():
        return f"the digit {ch}"
    return f"the {'lowercase' if ch.islower() else 'capital'} letter {ch}"


def class_prompts(templates: tuple[str, ...] = ("a picture of {}", "{}", "an image showing {}")) -> list[list[str]]:
    """Zero-shot prompts per class (the 62 characters), from templates never used in training captions."""
    return [[t.format(_describe(ch)) for t in templates] for ch in CHARACTERS]


def render_glyphs(image_size: int = 32) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Every character in every font, white on black, centred, scaled to [-1, 1].

    Returns:
        images (N, 1, image_size, image_size), labels (N,) character index, captions (N,), font file per image.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    images, labels, captions, fonts = [], [], [], []
    canvas = 4 * image_size
    for file, (family, style) in GLYPH_FONTS.items():
        font = ImageFont.truetype(str(font_dir / file), int(canvas * 0.7))
        for index, ch in enumerate(CHARACTERS):
            img = Image.new("L", (canvas, canvas), 0)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            draw.text(((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top), ch, fill=255, font=font)
            img = img.resize((image_size, image_size), Image.LANCZOS)
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, image_size, image_size))
            labels.append(index)
            captions.append(f"{_describe(ch)} in {family} {style}")
            fonts.append(file)
    pixels = torch.stack(images).float() / 255.0 * 2.0 - 1.0
    return pixels, torch.tensor(labels), captions, fonts


def build_tokenizer(texts: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts`` (case kept: 'g' != 'G'),
    deterministic: ids in order of first appearance after the special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


class _Pairs(Dataset):
    def __init__(self, images: Tensor, captions: list[str], labels: Tensor) -> None:
        self.images, self.captions, self.labels = images, captions, labels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.images[i], self.captions[i], self.labels[i]


class ImageTextDataModule(SplitDataModule):
    """Batches of (images, token ids, attention mask, labels) for contrastive training.

    Args:
        dataset: ``"glyphs"`` (built in: the 62 letters and digits in matplotlib's 21 text fonts,
            1,302 images, captions like "the lowercase letter g in dejavu serif bold italic"; split
            by font, 15 / 3 / 3 fonts, so validation and test fonts are unseen) or ``"pairs"``: a CSV
            (columns ``image,caption``) or JSONL (keys ``image``, ``caption``) file per split
            (``train``, ``val``, ``test``) under ``root``, CC3M-style, with image paths relative to it.
        root: folder of ``pairs``.
        tokenizer: a Hugging Face tokenizer folder; default: a word-level tokenizer built from the
            training captions (saved with :meth:`save_tokenizer`).
        image_size, max_text_len, batch_size, num_workers, seed: as usual.
        channels: image channels for ``pairs`` (1 = grey, 3 = RGB; the glyphs are grey).
        augment: random shifts of up to an eighth of the image in training.
    """

    def __init__(
        self,
        dataset: str = "glyphs",
        root: str | None = None,
        tokenizer: str | None = None,
        image_size: int = 32,
        max_text_len: int = 16,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        channels: int = 1,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if dataset not in ("glyphs", "pairs"):
            raise ValueError(f"dataset must be 'glyphs' or 'pairs', got {dataset!r}")
        if dataset == "pairs" and not root:
            raise ValueError("dataset='pairs' needs root=<folder with train/val/test .csv or .jsonl>")
        self.dataset, self.root, self.tokenizer_path = dataset, root, tokenizer
        self.image_size, self.max_text_len, self.batch_size = image_size, max_text_len, batch_size
        self.eval_batch_size = batch_size
        self.num_workers, self.seed, self.augment, self.channels = num_workers, seed, augment, channels
        self.splits: dict[str, _Pairs] = {}
        self.tokenizer = None
        self.save_hyperparameters()

    # -- data ------------------------------------------------------------------------------------
    def _glyph_splits(self) -> dict[str, _Pairs]:
        images, labels, captions, fonts = render_glyphs(self.image_size)
        order = sorted(GLYPH_FONTS)
        random.Random(self.seed).shuffle(order)
        chosen = {"train": set(order[:15]), "val": set(order[15:18]), "test": set(order[18:])}
        out = {}
        for split, keep in chosen.items():
            idx = [i for i, f in enumerate(fonts) if f in keep]
            out[split] = _Pairs(images[idx], [captions[i] for i in idx], labels[idx])
        return out

    def _read_pairs(self, split: str) -> _Pairs:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        root = Path(self.root)
        file = next((root / f"{split}{ext}" for ext in (".csv", ".jsonl") if (root / f"{split}{ext}").is_file()), None)
        if file is None:
            raise FileNotFoundError(f"ImageTextDataModule: no {split}.csv or {split}.jsonl under {root}")
        if file.suffix == ".csv":
            rows = list(csv.DictReader(file.open()))
        else:
            rows = [json.loads(line) for line in file.open() if line.strip()]
        images = []
        for row in rows:
            img = Image.open(root / row["image"]).convert("L" if self.channels == 1 else "RGB")
            img = img.resize((self.image_size, self.image_size))
            images.append(pil_to_tensor(img).float() / 255.0 * 2.0 - 1.0)
        return _Pairs(torch.stack(images), [row["caption"] for row in rows], torch.full((len(rows),), -1))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset == "glyphs":
            self.splits = self._glyph_splits()
        else:
            self.splits = {s: self._read_pairs(s) for s in ("train", "val", "test")}
        if self.tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        else:
            self.tokenizer = build_tokenizer(self.splits["train"].captions + [p for c in class_prompts() for p in c])

    def save_tokenizer(self, directory: str | Path) -> None:
        """Save the tokenizer next to a model (``tokenizer.json`` + config), loadable with
        ``ImageTextDataModule(tokenizer=directory)`` or ``AutoTokenizer.from_pretrained``."""
        self.setup()
        self.tokenizer.save_pretrained(str(directory))

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """texts -> (ids (B, max_text_len), attention mask (B, max_text_len) bool)."""
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_len,
                                 return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"].bool()

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.tokenizer)

    # -- loaders ---------------------------------------------------------------------------------
    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        return self.splits[split]

    def collate_for(self, train: bool):
        def collate(batch):
            images = torch.stack([b[0] for b in batch])
            if train and self.augment:
                pad = max(self.image_size // 8, 1)
                padded = F.pad(images, (pad, pad, pad, pad), value=-1.0)
                offsets = torch.randint(0, 2 * pad + 1, (len(batch), 2)).tolist()
                images = torch.stack([padded[i, :, dy : dy + self.image_size, dx : dx + self.image_size]
                                      for i, (dy, dx) in enumerate(offsets)])
            ids, mask = self.tokenize([b[1] for b in batch])
            return images, ids, mask, torch.stack([b[2] for b in batch])
        return collate
