"""``SpeechDataModule``: built-in eSpeak NG speech (no download), folders of audio, LibriSpeech, SpeechCommands.

The built-in set is real synthesised speech: transcripts of spelled-out digit strings and command
words, rendered once by eSpeak NG (pip ``espeakng-loader``) with 8 English accents x 104 voice
variants, random rate, pitch and pitch range, a random lead-in and white noise at a random SNR,
resampled to 16 kHz and cached in the user cache directory under a key of the eSpeak version, the
seed and every render setting. The same seed gives the same samples.

eSpeak's voice variants share one synthesiser, so a model that has heard a variant recognises it
far better than a new speaker (DATA.md: a linear model scores 0.99 on held-out eSpeak variants
and chance on another synthesiser). The split is therefore by voice: the 104 variants are shuffled
with the seed and cut 70/15/15 into train, validation and test, so validation and test speakers are
never heard in training (every accent appears in every split; the accent is a label, not a speaker).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from moezoo.checks import import_extra, require_int
from moezoo.data import SplitDataModule
from moezoo.modalities.speech.features import SpecAugment, SpeechFeatures

__all__ = [
    "COMMANDS",
    "DIGITS",
    "KEYWORDS",
    "CharTokenizer",
    "SpeechDataModule",
    "SpeechDataset",
    "Utterance",
    "collate_speech",
    "generate_transcripts",
    "load_espeak_split",
    "render_espeak_split",
]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The ten command words of Speech Commands v2 plus four of its auxiliary words.
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "forward", "backward",
            "follow", "learn")
#: Keyword-spotting classes of the built-in ``transcripts="keywords"`` data (Speech Commands' 20 core words).
KEYWORDS = COMMANDS[:10] + DIGITS
DOMAINS = ("digits", "commands")
TRANSCRIPT_KINDS = ("mixed", "digits", "commands", "keywords")
DATASETS = ("espeak", "folder", "librispeech", "speechcommands")
_SPLITS = ("train", "val", "test")
#: Bumped whenever the rendering recipe changes, so old caches are not reused.
RENDER_VERSION = 1


class CharTokenizer:
    """Characters for CTC: 0 = blank, 1 = space, 2 = apostrophe, 3.. = a-z (29 symbols).

    Text is lower-cased; other characters are dropped and runs of spaces collapsed.
    """

    BLANK = 0

    def __init__(self) -> None:
        self.symbols = ["<blank>", " ", "'"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def normalize(self, text: str) -> str:
        kept = "".join(c for c in text.lower() if c in self.index and c != "<blank>")
        return " ".join(kept.split())

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in self.normalize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != self.BLANK)


@dataclass
class Utterance:
    """One utterance's transcript and labels (-1: unknown)."""

    text: str
    keyword: int = -1
    domain: int = -1
    accent: int = -1
    speaker: str = ""


def generate_transcripts(count: int, kind: str, rng: np.random.Generator) -> list[Utterance]:
    """``count`` transcripts: spelled digit strings (1-4 digits), command phrases (1-3 words), both
    (``"mixed"``, half each), or single keywords (``"keywords"``, labelled by index in :data:`KEYWORDS`)."""
    if kind not in TRANSCRIPT_KINDS:
        raise ValueError(f"transcripts must be one of {TRANSCRIPT_KINDS}, got {kind!r}")
    out = []
    for _ in range(count):
        if kind == "keywords":
            label = int(rng.integers(len(KEYWORDS)))
            out.append(Utterance(KEYWORDS[label], keyword=label, domain=int(KEYWORDS[label] in DIGITS)))
            continue
        domain = {"digits": 0, "commands": 1}.get(kind, int(rng.integers(2)))
        words = DIGITS if domain == 0 else COMMANDS
        length = int(rng.integers(1, 5 if domain == 0 else 4))
        text = " ".join(words[int(i)] for i in rng.integers(len(words), size=length))
        keyword = KEYWORDS.index(text) if text in KEYWORDS else -1
        out.append(Utterance(text, keyword=keyword, domain=domain))
    return out


@dataclass(frozen=True)
class RenderSettings:
    """How the built-in set is rendered; every field is part of the cache key."""

    seed: int = 0
    transcripts: str = "mixed"
    num_train: int = 3000
    num_val: int = 300
    num_test: int = 300
    sample_rate: int = 16000
    rate_wpm: tuple[int, int] = (130, 220)
    pitch: tuple[int, int] = (25, 75)
    pitch_range: tuple[int, int] = (30, 70)
    snr_db: tuple[float, float] = (10.0, 40.0)
    lead_in_s: float = 0.2


def _voice_split(variants: list[str], seed: int) -> dict[str, list[str]]:
    order = np.random.default_rng([seed, 7]).permutation(len(variants))
    n_train, n_val = round(0.70 * len(variants)), round(0.15 * len(variants))
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {split: sorted(variants[i] for i in idx) for split, idx in cuts.items()}


def render_espeak_split(settings: RenderSettings, split: str, count: int | None = None,
                        workers: int = 2) -> tuple[np.ndarray, np.ndarray, list[Utterance]]:
    """Render one split of the built-in set (no cache).

    Args:
        settings: the render settings.
        split: "train", "val" or "test" (its voices are disjoint from the other splits').
        count: utterances (default: the split's size in ``settings``); the first ``count`` of a
            larger render have the same transcripts and voices.
        workers: parallel eSpeak processes (the samples do not depend on it).

    Returns:
        audio (total samples,) int16 at ``settings.sample_rate``, offsets (count + 1,) int64 and the
        utterances (``speaker`` = ``"<accent>+<variant>"``).
    """
    from moezoo.modalities.speech.espeak import ENGLISH_ACCENTS, synthesize, voice_variants

    torchaudio = import_extra("torchaudio", "speech")

    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    count = getattr(settings, f"num_{split}") if count is None else count
    split_index = _SPLITS.index(split)
    voices = _voice_split(voice_variants(), settings.seed)[split]
    rng = np.random.default_rng([settings.seed, split_index])
    utterances = generate_transcripts(count, settings.transcripts, rng)
    items = []
    for i, utt in enumerate(utterances):
        accent = int(rng.integers(len(ENGLISH_ACCENTS)))
        variant = voices[int(rng.integers(len(voices)))]
        utt.accent, utt.speaker = accent, f"{ENGLISH_ACCENTS[accent]}+{variant}"
        items.append((utt.text, utt.speaker, int(rng.integers(settings.rate_wpm[0], settings.rate_wpm[1] + 1)),
                      int(rng.integers(settings.pitch[0], settings.pitch[1] + 1)),
                      int(rng.integers(settings.pitch_range[0], settings.pitch_range[1] + 1)),
                      1 + i + 1_000_003 * split_index + 7_919 * settings.seed))
    synth_rate, waves = synthesize(items, workers=workers)

    out = []
    for i, wave in enumerate(waves):
        noise_rng = np.random.default_rng([settings.seed, split_index, i])
        x = torch.from_numpy(wave.astype(np.float32) / 32768.0)
        x = torchaudio.functional.resample(x, synth_rate, settings.sample_rate)
        lead = np.zeros(int(noise_rng.integers(0, int(settings.lead_in_s * settings.sample_rate) + 1)), np.float32)
        x = np.concatenate([lead, x.numpy()])
        power = float(np.mean(x**2)) if x.size else 0.0
        snr = noise_rng.uniform(*settings.snr_db)
        x = x + noise_rng.standard_normal(x.size).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
        x = x / max(float(np.abs(x).max()), 1e-6) * noise_rng.uniform(0.3, 0.9)
        out.append(np.round(x * 32767).astype(np.int16))
    offsets = np.cumsum([0] + [len(x) for x in out]).astype(np.int64)
    return np.concatenate(out), offsets, utterances


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MOEZOO_CACHE"):
        return Path(os.environ["MOEZOO_CACHE"]) / "speech"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moezoo" / "speech"


def load_espeak_split(settings: RenderSettings, split: str, cache_dir: str | os.PathLike | None = None,
                      workers: int = 2) -> tuple[np.ndarray, np.ndarray, list[Utterance]]:
    """One split of the built-in set, rendered on first use and then read from the cache
    (``$MOEZOO_CACHE/speech`` or ``~/.cache/moezoo/speech``; the audio is memory-mapped). Splits are
    rendered and cached separately, so evaluating on the test split never renders the training set."""
    from moezoo.modalities.speech.espeak import espeak_version

    key_data = {"render": RENDER_VERSION, "espeak": espeak_version(), **asdict(settings)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    folder = _cache_root(cache_dir) / f"espeak-{key}" / split
    if not (folder / "utterances.json").is_file():
        staging = folder.parent / f".{split}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        audio, offsets, utterances = render_espeak_split(settings, split, workers=workers)
        np.save(staging / "audio.npy", audio)
        np.save(staging / "offsets.npy", offsets)
        (folder.parent / "settings.json").write_text(json.dumps(key_data, indent=2))
        (staging / "utterances.json").write_text(json.dumps([asdict(u) for u in utterances]))
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same render first
            shutil.rmtree(staging, ignore_errors=True)
    return (np.load(folder / "audio.npy", mmap_mode="r"), np.load(folder / "offsets.npy"),
            [Utterance(**u) for u in json.loads((folder / "utterances.json").read_text())])


def _read_audio(path: str | os.PathLike, sample_rate: int) -> Tensor:
    """A mono float waveform at ``sample_rate`` (soundfile reads it; torchaudio resamples)."""
    soundfile, torchaudio = import_extra("soundfile", "speech"), import_extra("torchaudio", "speech")
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.mean(axis=1))
    return torchaudio.functional.resample(wave, rate, sample_rate) if rate != sample_rate else wave


class SpeechDataset(Dataset):
    """Utterances as ``dict(features (frames, bins), tokens (labels,), keyword, domain, accent, text)``.

    Args:
        load_audio: index -> (samples,) float waveform at the featuriser's sample rate.
        utterances: transcripts and labels, one per index.
        features: the featuriser.
        tokenizer: text -> CTC labels.
        augment: SpecAugment applied on every access (training), or None.
        cache_features: keep each utterance's features after the first access (in-memory sets).
    """

    def __init__(self, load_audio: Callable[[int], Tensor], utterances: list[Utterance], features: SpeechFeatures,
                 tokenizer: CharTokenizer, augment: SpecAugment | None = None, cache_features: bool = True) -> None:
        self.load_audio, self.utterances = load_audio, utterances
        self.features, self.tokenizer, self.augment = features, tokenizer, augment
        self.cache: dict[int, Tensor] | None = {} if cache_features else None

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        feats = None if self.cache is None else self.cache.get(index)
        if feats is None:
            feats = self.features(self.load_audio(index))
            if self.cache is not None:
                self.cache[index] = feats
        if self.augment is not None:
            feats = self.augment(feats)
        utt = self.utterances[index]
        return {
            "features": feats,
            "tokens": torch.tensor(self.tokenizer.encode(utt.text), dtype=torch.long),
            "keyword": utt.keyword, "domain": utt.domain, "accent": utt.accent, "text": utt.text,
        }


def collate_speech(items: list[dict]) -> dict:
    """Pad a list of :class:`SpeechDataset` items into a batch.

    Returns:
        ``features`` (batch, max frames, bins) zero-padded, ``lengths`` (batch,), ``targets`` (batch,
        max labels) padded with 0, ``target_lengths`` (batch,), ``keyword`` / ``domain`` / ``accent``
        (batch,) int64 (-1 unknown) and ``text`` (list of str).
    """
    lengths = torch.tensor([it["features"].shape[0] for it in items], dtype=torch.long)
    bins = items[0]["features"].shape[1]
    features = torch.zeros(len(items), int(lengths.max()), bins)
    target_lengths = torch.tensor([it["tokens"].numel() for it in items], dtype=torch.long)
    targets = torch.zeros(len(items), max(int(target_lengths.max()), 1), dtype=torch.long)
    for i, it in enumerate(items):
        features[i, : lengths[i]] = it["features"]
        targets[i, : target_lengths[i]] = it["tokens"]
    batch = {"features": features, "lengths": lengths, "targets": targets, "target_lengths": target_lengths,
             "text": [it["text"] for it in items]}
    for name in ("keyword", "domain", "accent"):
        batch[name] = torch.tensor([it[name] for it in items], dtype=torch.long)
    return batch


class SpeechDataModule(SplitDataModule):
    """Speech for :class:`~moezoo.modalities.speech.SpeechRecognition`.

    Args:
        dataset: ``"espeak"`` (built in, see the module docstring); ``"folder"``: ``root/{train,val,test}/``
            each with audio files readable by soundfile and a ``transcripts.tsv`` (``relative path<TAB>
            text`` per line); ``"librispeech"``: torchaudio's ``LIBRISPEECH`` layout already under
            ``root`` (``LibriSpeech/<subset>``; never downloaded); ``"speechcommands"``: torchaudio's
            ``SPEECHCOMMANDS`` v0.02 under ``root`` (keyword labels = the sorted word folders).
        root: dataset folder for the non-built-in sets.
        transcripts: built-in transcripts: ``"mixed"`` (digit strings and command phrases), ``"digits"``,
            ``"commands"`` or ``"keywords"`` (one of the 20 :data:`KEYWORDS` per utterance, labelled).
        num_train, num_val, num_test: built-in utterances per split.
        seed: built-in render and voice-split seed.
        librispeech_subsets: (train, val, test) LibriSpeech subset names.
        sample_rate: audio sample rate fed to the features.
        feature_kind, num_mel_bins, dither, normalize: see :class:`SpeechFeatures`.
        spec_augment: SpecAugment on training utterances.
        freq_masks, freq_width, time_masks, time_width: SpecAugment settings.
        batch_size, eval_batch_size, num_workers: loaders.
        cache_dir: where the built-in render is cached (default ``$MOEZOO_CACHE/speech`` or
            ``~/.cache/moezoo/speech``).
        render_workers: parallel eSpeak processes for the first render.
    """

    def __init__(
        self,
        dataset: str = "espeak",
        root: str | None = None,
        transcripts: str = "mixed",
        num_train: int = 3000,
        num_val: int = 300,
        num_test: int = 300,
        seed: int = 0,
        librispeech_subsets: tuple[str, str, str] = ("train-clean-100", "dev-clean", "test-clean"),
        sample_rate: int = 16000,
        feature_kind: str = "fbank",
        num_mel_bins: int = 40,
        dither: float = 0.0,
        normalize: bool = True,
        spec_augment: bool = True,
        freq_masks: int = 2,
        freq_width: int = 8,
        time_masks: int = 2,
        time_width: int = 10,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        render_workers: int = 2,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"SpeechDataModule: dataset must be one of {DATASETS}, got {dataset!r}")
        if dataset != "espeak" and not root:
            raise ValueError(f"SpeechDataModule: dataset={dataset!r} needs root=<folder on disk>")
        if transcripts not in TRANSCRIPT_KINDS:
            raise ValueError(f"SpeechDataModule: transcripts must be one of {TRANSCRIPT_KINDS}, got {transcripts!r}")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                            ("batch_size", batch_size)):
            require_int("SpeechDataModule", name, value)
        self.dataset, self.root, self.transcripts = dataset, root, transcripts
        self.settings = RenderSettings(seed=seed, transcripts=transcripts, num_train=num_train, num_val=num_val,
                                       num_test=num_test, sample_rate=sample_rate)
        self.librispeech_subsets = tuple(librispeech_subsets)
        self.features = SpeechFeatures(feature_kind, num_mel_bins, sample_rate, dither=dither, normalize=normalize)
        self.augment = SpecAugment(freq_masks, freq_width, time_masks, time_width) if spec_augment else None
        self.tokenizer = CharTokenizer()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.cache_dir, self.render_workers = num_workers, cache_dir, render_workers
        self.splits: dict[str, SpeechDataset] = {}
        self.keywords: tuple[str, ...] = KEYWORDS
        self.save_hyperparameters()

    @property
    def num_keywords(self) -> int:
        return len(self.keywords)

    def _dataset(self, split: str, load: Callable[[int], Tensor], utterances: list[Utterance],
                 in_memory: bool) -> SpeechDataset:
        augment = self.augment if split == "train" else None
        return SpeechDataset(load, utterances, self.features, self.tokenizer, augment, cache_features=in_memory)

    def _espeak(self, split: str) -> SpeechDataset:
        audio, offsets, utterances = load_espeak_split(self.settings, split, self.cache_dir, self.render_workers)

        def load(i: int) -> Tensor:
            return torch.from_numpy(audio[offsets[i] : offsets[i + 1]].astype(np.float32) / 32768.0)

        return self._dataset(split, load, utterances, True)

    def _folder(self, split: str) -> SpeechDataset:
        folder = Path(self.root) / split
        listing = folder / "transcripts.tsv"
        if not listing.is_file():
            if split == "test":  # a folder set without test/ is evaluated on val/
                return self._split("val")
            raise FileNotFoundError(f"SpeechDataModule: {listing} is missing (lines: relative path<TAB>text)")
        rows = [line.split("\t", 1) for line in listing.read_text().splitlines() if line.strip()]
        paths = [folder / p for p, _ in rows]
        utterances = [Utterance(t.strip()) for _, t in rows]
        return self._dataset(split, lambda i: _read_audio(paths[i], self.features.sample_rate), utterances, False)

    def _librispeech(self, split: str) -> SpeechDataset:
        from torchaudio.datasets import LIBRISPEECH

        subset = self.librispeech_subsets[_SPLITS.index(split)]
        try:
            corpus = LIBRISPEECH(self.root, url=subset, download=False)
        except (RuntimeError, FileNotFoundError) as err:
            raise FileNotFoundError(f"LibriSpeech {subset} is not under {self.root} (moezoo never downloads)") from err
        # get_metadata lists files and transcripts without decoding audio (torchaudio.load needs
        # TorchCodec; soundfile reads the FLAC files). Its paths are relative to corpus._archive.
        meta = [corpus.get_metadata(i) for i in range(len(corpus))]
        base = Path(corpus._archive)
        utterances = [Utterance(m[2], speaker=str(m[3])) for m in meta]
        return self._dataset(split, lambda i: _read_audio(base / meta[i][0], self.features.sample_rate),
                             utterances, False)

    def _speechcommands(self, split: str) -> SpeechDataset:
        from torchaudio.datasets import SPEECHCOMMANDS

        subset = {"train": "training", "val": "validation", "test": "testing"}[split]
        try:
            corpus = SPEECHCOMMANDS(self.root, subset=subset, download=False)
        except (RuntimeError, FileNotFoundError) as err:
            raise FileNotFoundError(f"SpeechCommands is not under {self.root} (moezoo never downloads)") from err
        if len(corpus) == 0:
            raise FileNotFoundError(f"SpeechCommands {subset} under {self.root} is empty (moezoo never downloads)")
        meta = [corpus.get_metadata(i) for i in range(len(corpus))]  # paths relative to corpus._archive
        base = Path(corpus._archive)
        if split == "train":
            self.keywords = tuple(sorted({m[2] for m in meta}))
        utterances = [Utterance(m[2], keyword=self.keywords.index(m[2]) if m[2] in self.keywords else -1,
                                speaker=m[3]) for m in meta]
        return self._dataset(split, lambda i: _read_audio(base / meta[i][0], self.features.sample_rate),
                             utterances, False)

    def _split(self, split: str) -> SpeechDataset:
        """The dataset of ``split``, built (and for the built-in set rendered) on first use."""
        if split not in self.splits:
            if self.dataset == "speechcommands" and split != "train" and "train" not in self.splits:
                self._split("train")  # the keyword classes are the training set's words
            self.splits[split] = getattr(self, f"_{self.dataset}")(split)
        return self.splits[split]

    def setup(self, stage: str | None = None) -> None:
        """Build the splits a stage needs (all three for fitting or when ``stage`` is None)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, _SPLITS):
            self._split(split)

    def dataset_for(self, split: str) -> Dataset:
        return self._split(split)

    def collate_for(self, train: bool):
        return collate_speech




