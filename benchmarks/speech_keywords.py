"""SpeechMoE keyword spotting on held-out eSpeak voices: keyword accuracy and CER of a fresh fit of
configs/speech/speechmoe_keywords_espeak.yaml (no shipped weights: the figure is this run's).

    python benchmarks/speech_keywords.py                        # fits the config, then evaluates
    python benchmarks/speech_keywords.py --checkpoint last.ckpt  # evaluates an earlier fit

The fit is that of ``moezoo fit --config configs/speech/speechmoe_keywords_espeak.yaml
--trainer.logger false`` (the same CLI, in this process); the evaluation is
:func:`moezoo.modalities.speech.evaluate.evaluate_keywords_heldout` (300 test utterances by voices never
heard in training, greedy CTC decoding, keyword head argmax). Writes
benchmarks/results/speech_keywords.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from moezoo.lightning_cli import MoezooCLI
from moezoo.modalities.speech.evaluate import evaluate_keywords_heldout
from moezoo.zoo.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/speech/speechmoe_keywords_espeak.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate this fit instead of fitting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cli = MoezooCLI(args=["--config", str(ROOT / CONFIG), "--trainer.default_root_dir", root,
                              "--trainer.logger", "false"], run=False)
        model = cli.model.model
        seconds = None
        if args.checkpoint is None:
            start = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            seconds = round(time.perf_counter() - start, 1)
        else:
            load_checkpoint(model, args.checkpoint)
    metrics = evaluate_keywords_heldout(model)
    record = {
        "title": "SpeechMoE keyword spotting, held-out eSpeak voices (one seed)",
        "command": "python benchmarks/speech_keywords.py",
        "config": CONFIG,
        "epochs": cli.trainer.max_epochs,
        "fit_seconds": seconds,
        "metrics": metrics,
        "keywords": model.num_keywords,
        "chance_accuracy": 1.0 / model.num_keywords,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }
    out = ROOT / "benchmarks" / "results" / "speech_keywords.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
