"""DeepSeekMoE's fine-grained + shared experts beside their plain twin at equal active parameters, tiny
scale: a V-MoE-Ti on the digits and a byte-level top-k MoE LM on the pydoc corpus, each trained for a
few hundred steps from its config, one seed (the configs' ``seed_everything: 0``).

    python benchmarks/fine_grained_twins.py --vision-steps 200 --text-steps 200

Writes benchmarks/results/fine_grained_twins.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moezoo.layers.routed import parameter_counts
from moezoo.lightning_cli import MoezooCLI

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {
    "vision": ("configs/vision/vmoe_ti_digits.yaml", "configs/vision/vmoe_fine_grained_ti_digits.yaml"),
    "text": ("configs/text/lm_moe_pydoc.yaml", "configs/text/lm_moe_fine_grained_pydoc.yaml"),
}


def run(config: str, steps: int) -> dict:
    """Fit ``config`` for ``steps`` optimiser steps, then its validation metrics."""
    args = ["--config", str(ROOT / config), "--trainer.max_steps", str(steps), "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1000"]
    cli = MoezooCLI(args=args, run=False)
    model = cli.model.model
    counts = parameter_counts(model)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"config": config, "steps": steps, "parameters": counts["total"], "active_parameters": counts["active"],
            "train_seconds": round(seconds, 1),
            **{k: round(float(v), 4) for k, v in metrics.items() if not k.startswith("routing")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-steps", type=int, default=200)
    parser.add_argument("--text-steps", type=int, default=200)
    parser.add_argument("--only", choices=sorted(PAIRS), default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fine_grained_twins.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {"vision": args.vision_steps, "text": args.text_steps}
    out = Path(args.out)
    for task in [args.only] if args.only else sorted(PAIRS):
        rows = [{"task": task, **run(config, steps[task])} for config in PAIRS[task]]
        # Re-read: the two tasks may run as two processes writing the same file.
        record = json.loads(out.read_text()) if out.exists() else {"rows": []}
        record["rows"] = [r for r in record["rows"] if r["task"] != task] + rows
        record["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
