"""SpeechMoE keyword spotting on held-out eSpeak voices: keyword accuracy and CER of a fresh fit of
configs/speech/speechmoe_keywords_espeak.yaml (no shipped weights: the figure is this run's).

    python benchmarks/speech_keywords.py                        # fits the config, then evaluates
    python benchmarks/speech_keywords.py --checkpoint last.ckpt  # evaluates an earlier fit

The fit is ``moezoo fit --config configs/speech/speechmoe_keywords_espeak.yaml
--trainer.default_root_dir DIR --trainer.logger false``; the evaluation is
:func:`moezoo.modalities.speech.evaluate.evaluate_keywords_heldout` (300 test utterances by voices never
heard in training, greedy CTC decoding, keyword head argmax). Writes
benchmarks/results/speech_keywords.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import moezoo
from moezoo.modalities.speech import SpeechMoE
from moezoo.modalities.speech.evaluate import evaluate_keywords_heldout

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/speech/speechmoe_keywords_espeak.yaml"


def fit(root: Path) -> tuple[Path, float]:
    """Fit the config into ``root``: the last checkpoint and the wall-clock seconds of the fit."""
    command = [sys.executable, "-m", "moezoo.cli", "fit", "--config", CONFIG, "--trainer.default_root_dir",
               str(root), "--trainer.logger", "false"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    return max(root.glob("**/*.ckpt"), key=lambda p: p.stat().st_mtime), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate this fit instead of fitting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, seconds = (args.checkpoint, None) if args.checkpoint else fit(Path(tmp))
        config = yaml.safe_load((ROOT / CONFIG).read_text())
        model = SpeechMoE(**config["model"]["init_args"]["model"]["init_args"])
        moezoo.load_checkpoint(model, checkpoint)
        metrics = evaluate_keywords_heldout(model)
    record = {
        "title": "SpeechMoE keyword spotting, held-out eSpeak voices (one seed)",
        "command": "python benchmarks/speech_keywords.py",
        "config": CONFIG,
        "epochs": config["trainer"]["max_epochs"],
        "fit_seconds": seconds,
        "metrics": metrics,
        "keywords": config["model"]["init_args"]["model"]["init_args"]["num_keywords"],
        "chance_accuracy": 1.0 / config["model"]["init_args"]["model"]["init_args"]["num_keywords"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }
    out = ROOT / "benchmarks" / "results" / "speech_keywords.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
