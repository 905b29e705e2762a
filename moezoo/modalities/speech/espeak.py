"""eSpeak NG synthesis through ctypes (pip ``espeakng-loader``), reproducible for a seed.

eSpeak NG keeps state between utterances inside one process (pitch flutter, Klatt resonators, its
noise generators), so the same call does not give the same samples twice in a process. What is
reproducible is a *fresh* process replaying the same call sequence with seeded generators. So
:func:`synthesize` renders fixed-size chunks of utterances, each in a new Python process that runs
this file as a script (it imports nothing from moezoo or torch, so a chunk starts in ~0.1 s), and
the output does not depend on how many chunks run in parallel.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moezoo.checks import import_extra

__all__ = ["CHUNK", "ENGLISH_ACCENTS", "espeak_version", "synthesize", "voice_variants"]

#: Utterances rendered per fresh process; part of what makes a render reproducible.
CHUNK = 128

#: eSpeak NG's English dialects (``lang/gmw``), the "accents" of the built-in data.
ENGLISH_ACCENTS = (
    "en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH, _RANGE = 1, 3, 4
_END_PAUSE = 0x1000


def _paths() -> tuple[str, str]:
    espeakng_loader = import_extra("espeakng_loader", "speech")  # the built-in speech data's renderer
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def voice_variants() -> list[str]:
    """The names of eSpeak NG's voice variants (``espeak-ng-data/voices/!v``), sorted."""
    _, data = _paths()
    return sorted(p.name for p in (Path(data) / "voices" / "!v").iterdir() if p.is_file())


def espeak_version() -> str:
    """``"<espeakng-loader version>/<libespeak-ng file name>"``: the cache key of rendered audio."""
    from importlib.metadata import version

    library, _ = _paths()
    return f"{version('espeakng-loader')}/{Path(library).resolve().name}"


def _render_chunk(library: str, data: str, items: list[list]) -> tuple[int, list[np.ndarray]]:
    """In a fresh process: (sample rate, int16 waveform per ``[text, voice, rate, pitch, range, seed]``)."""
    lib = ctypes.CDLL(library)
    libc = ctypes.CDLL(None)
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with data at {data}")
    pieces: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    @callback_type
    def collect(samples, count, events):
        if count > 0:
            pieces.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    lib.espeak_SetSynthCallback(collect)
    waves = []
    for text, voice, rate, pitch, pitch_range, seed in items:
        pieces.clear()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
        # Breath and frication noise come from eSpeak's own generator and from libc's rand().
        lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed)))
        libc.srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
        encoded = text.encode()
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, _END_PAUSE, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
        lib.espeak_Synchronize()
        waves.append(np.concatenate(pieces) if pieces else np.zeros(0, np.int16))
    lib.espeak_Terminate()
    return sample_rate, waves


def _run_chunk(items: list[list]) -> tuple[int, list[np.ndarray]]:
    library, data = _paths()
    with tempfile.TemporaryDirectory(prefix="moezoo-espeak-") as tmp:
        out = Path(tmp) / "chunk.npz"
        job = json.dumps({"library": library, "data": data, "items": items, "out": str(out)})
        result = subprocess.run([sys.executable, __file__], input=job, text=True, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"eSpeak NG render failed:\n{result.stderr[-2000:]}")
        with np.load(out) as f:
            offsets = f["offsets"]
            audio = f["audio"]
            rate = int(f["sample_rate"])
    return rate, [audio[offsets[i] : offsets[i + 1]] for i in range(len(items))]


def synthesize(items: list[tuple[str, str, int, int, int, int]], workers: int = 2) -> tuple[int, list[np.ndarray]]:
    """Render ``(text, voice, rate wpm, pitch 0..99, pitch range 0..99, seed)`` items with eSpeak NG.

    Items are cut into chunks of :data:`CHUNK`, each rendered by a fresh process, ``workers`` at a time.

    Returns:
        (sample rate (22,050 Hz), one int16 waveform per item).
    """
    if not items:
        return 22050, []
    chunks = [[list(it) for it in items[i : i + CHUNK]] for i in range(0, len(items), CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(_run_chunk, chunks))
    rates = {rate for rate, _ in results}
    if len(rates) != 1:
        raise RuntimeError(f"eSpeak NG returned different sample rates {rates}")
    return rates.pop(), [wave for _, waves in results for wave in waves]


def _main() -> None:
    job = json.loads(sys.stdin.read())
    rate, waves = _render_chunk(job["library"], job["data"], job["items"])
    offsets = np.cumsum([0] + [len(w) for w in waves])
    audio = np.concatenate(waves) if waves else np.zeros(0, np.int16)
    np.savez(job["out"], audio=audio, offsets=offsets, sample_rate=rate)


if __name__ == "__main__":
    _main()
