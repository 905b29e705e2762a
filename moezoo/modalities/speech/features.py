"""Acoustic features through torchaudio: Kaldi fbank or log-Mel, per-utterance normalisation, SpecAugment."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moezoo.checks import import_extra, require_int

torchaudio = import_extra("torchaudio", "speech")

__all__ = ["FEATURE_KINDS", "SpecAugment", "SpeechFeatures", "normalize_utterance"]

FEATURE_KINDS = ("fbank", "mel")


def normalize_utterance(features: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance mean and variance normalisation (CMVN) of each feature bin over time.

    Args:
        features: (frames, bins).

    Returns:
        (frames, bins) with zero mean and unit (population) variance per bin.
    """
    mean = features.mean(dim=0, keepdim=True)
    std = features.std(dim=0, unbiased=False, keepdim=True)
    return (features - mean) / (std + eps)


class SpeechFeatures(nn.Module):
    """Waveform -> (frames, bins) features, 25 ms windows every 10 ms by default.

    Args:
        kind: ``"fbank"``: Kaldi-compatible log Mel filterbank
            (``torchaudio.compliance.kaldi.fbank``: pre-emphasis 0.97, povey window, DC removal);
            ``"mel"``: ``torchaudio.transforms.MelSpectrogram`` (Hann window, power 2) then ``log``.
        num_mel_bins: Mel bins (SpeechMoE: 40 [unverified]; WeNet / 3M-ASR: 80).
        sample_rate: waveform sample rate in Hz.
        frame_length_ms, frame_shift_ms: window and hop.
        dither: Kaldi dither (0 keeps features deterministic).
        normalize: per-utterance mean/variance normalisation.
    """

    def __init__(
        self,
        kind: str = "fbank",
        num_mel_bins: int = 40,
        sample_rate: int = 16000,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        dither: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ValueError(f"SpeechFeatures: kind must be one of {FEATURE_KINDS}, got {kind!r}")
        for name, value in (("num_mel_bins", num_mel_bins), ("sample_rate", sample_rate)):
            require_int("SpeechFeatures", name, value)
        if not 0 < frame_shift_ms <= frame_length_ms:
            raise ValueError(
                f"SpeechFeatures: need 0 < frame_shift_ms <= frame_length_ms, got {frame_shift_ms}, {frame_length_ms}"
            )
        if dither < 0:
            raise ValueError(f"SpeechFeatures: dither must be >= 0, got {dither}")
        self.kind, self.num_mel_bins, self.sample_rate = kind, num_mel_bins, sample_rate
        self.frame_length_ms, self.frame_shift_ms = frame_length_ms, frame_shift_ms
        self.dither, self.normalize = dither, normalize
        self.mel = None
        if kind == "mel":
            # n_fft = window length and no centring: the same frames as Kaldi's snip-edges framing.
            win = int(round(sample_rate * frame_length_ms / 1000))
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate, n_fft=win, win_length=win, hop_length=int(round(sample_rate * frame_shift_ms / 1000)),
                n_mels=num_mel_bins, center=False,
            )

    @property
    def dim(self) -> int:
        return self.num_mel_bins

    def num_frames(self, num_samples: int) -> int:
        """Frames for a waveform of ``num_samples`` (Kaldi's snip-edges framing, both kinds)."""
        win = int(round(self.sample_rate * self.frame_length_ms / 1000))
        hop = int(round(self.sample_rate * self.frame_shift_ms / 1000))
        return 0 if num_samples < win else 1 + (num_samples - win) // hop

    @torch.no_grad()
    def forward(self, waveform: Tensor) -> Tensor:
        """waveform: (samples,) float in [-1, 1] -> (frames, num_mel_bins) float32."""
        if waveform.dim() != 1:
            raise ValueError(f"SpeechFeatures: waveform must be 1-d (samples,), got shape {tuple(waveform.shape)}")
        wave = waveform.float()
        if self.kind == "fbank":
            # Kaldi works on 16-bit sample values.
            feats = torchaudio.compliance.kaldi.fbank(
                wave.unsqueeze(0) * 32768.0, num_mel_bins=self.num_mel_bins, sample_frequency=self.sample_rate,
                frame_length=self.frame_length_ms, frame_shift=self.frame_shift_ms, dither=self.dither,
                energy_floor=0.0,
            )
        else:
            feats = torch.log(self.mel(wave).clamp_min(1e-10)).transpose(0, 1)
        return normalize_utterance(feats) if self.normalize else feats


class SpecAugment(nn.Module):
    """SpecAugment (Park et al. 2019) without time warping: ``freq_masks`` masks of up to ``freq_width``
    bins (``torchaudio.transforms.FrequencyMasking``) and ``time_masks`` masks of up to ``time_width``
    frames (``torchaudio.transforms.TimeMasking``), applied to one utterance at a time so masks stay
    inside its own frames. Masked values are set to 0, the mean of normalised features.

    Args:
        freq_masks, freq_width: number and maximum width of frequency masks (WeNet/3M-ASR: 2, 30 of 80).
        time_masks, time_width: number and maximum width of time masks (WeNet/3M-ASR: 2, 50).
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 10, time_masks: int = 2, time_width: int = 20) -> None:
        super().__init__()
        for name, value in (("freq_masks", freq_masks), ("freq_width", freq_width), ("time_masks", time_masks),
                            ("time_width", time_width)):
            require_int("SpecAugment", name, value, low=0)
        self.freq_masks, self.time_masks = freq_masks, time_masks
        self.freq = torchaudio.transforms.FrequencyMasking(freq_width)
        self.time = torchaudio.transforms.TimeMasking(time_width)

    @torch.no_grad()
    def forward(self, features: Tensor) -> Tensor:
        """features: (frames, bins) -> (frames, bins), a masked copy."""
        spec = features.t().unsqueeze(0)  # torchaudio masks (..., freq, time)
        for _ in range(self.freq_masks):
            spec = self.freq(spec)
        for _ in range(self.time_masks):
            spec = self.time(spec)
        return spec.squeeze(0).t().contiguous()
