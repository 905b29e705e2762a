"""A short ``moezoo fit`` of a shipped config whose outcome the CLI tests can check.

The run keeps what a real run leaves behind, a Lightning checkpoint and a CSV log of every step, so
a test can assert what the fit did (optimiser steps taken, the learning rate the schedule reached,
the first losses) instead of only that it did not raise.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from moezoo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def two_step_fit(config: str, root: Path, *overrides: str) -> tuple[dict, list[dict[str, float]]]:
    """``moezoo fit --config configs/<config>.yaml`` for 2 optimiser steps, validated (1 batch) and so
    checkpointed after the second, with a CSV logger writing every step under ``root``.

    Returns:
        the final checkpoint, and the logged rows (column -> value, empty cells left out).
    """
    argv = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", "csv",
            *overrides]
    assert main(argv) == 0
    (checkpoint,) = (root / "csv").rglob("*.ckpt")
    (log,) = (root / "csv").rglob("metrics.csv")
    with log.open() as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return torch.load(checkpoint, map_location="cpu", weights_only=False), rows


def assert_two_warmup_steps(checkpoint: dict, lr: float, warmup_steps: int) -> None:
    """The fit took exactly 2 optimiser steps, and the schedule is where the config's linear warmup puts
    it after 2 steps: ``lr * (2 + 1) / warmup_steps`` (MoETask's warmup factor (step + 1) / warmup,
    worked by hand from the config's ``lr`` and ``warmup_steps``)."""
    assert checkpoint["global_step"] == 2
    (optimizer,) = checkpoint["optimizer_states"]
    # AdamW keeps a step count per parameter it updated: every trainable parameter, twice.
    assert len(optimizer["state"]) == sum(len(group["params"]) for group in optimizer["param_groups"])
    assert all(int(state["step"]) == 2 for state in optimizer["state"].values())
    expected = lr * 3 / warmup_steps
    assert all(abs(group["lr"] - expected) <= 1e-12 for group in optimizer["param_groups"])


def train_losses(rows: list[dict[str, float]], key: str = "train/loss_step") -> list[float]:
    """The per-step training losses, in step order."""
    return [row[key] for row in sorted(rows, key=lambda r: r["step"]) if key in row]
