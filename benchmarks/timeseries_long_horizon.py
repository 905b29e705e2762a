"""The Time-MoE paper's long-horizon protocol (MSE / MAE at horizons 96, 192, 336, 720) on a benchmark CSV.

    python benchmarks/timeseries_long_horizon.py --csv dataset/ETT-small/ETTh1.csv --model time_moe_50m
    python benchmarks/timeseries_long_horizon.py --csv my.csv --model Maple728/TimeMoE-200M --dtype bfloat16
    python benchmarks/timeseries_long_horizon.py --csv my.csv --model runs/x.ckpt --entry time_moe_tiny

``--model`` is a zoo entry (its pretrained weights), a folder or hub id in the reference layout, or, with
``--entry``, a checkpoint of that entry. The paper evaluates windows every point (``--stride 1``; the
ETTh1 96-step run is ~2.8k windows x 7 channels); the reference runs the public checkpoints in bfloat16.
Writes benchmarks/results/timeseries_long_horizon_<model>_<csv>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import moezoo
from moezoo.modalities.timeseries import TimeMoE, evaluate_csv

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(model: str, entry: str | None) -> TimeMoE:
    if entry is not None:
        return moezoo.create_model(entry, checkpoint_path=model)
    if model in moezoo.list_models():
        return moezoo.create_model(model, pretrained=True)
    return TimeMoE.from_pretrained(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, help="ETT-layout CSV (date column, then channels)")
    parser.add_argument("--model", default="time_moe_50m")
    parser.add_argument("--entry", default=None, help="zoo entry of a --model checkpoint file")
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = load(args.model, args.entry).to(device=args.device, dtype=DTYPES[args.dtype])
    start = time.time()
    metrics = evaluate_csv(model, args.csv, horizons=args.horizons, stride=args.stride, batch_size=args.batch_size)
    record = {"model": args.model, "csv": args.csv, "dtype": args.dtype, "stride": args.stride,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "seconds": round(time.time() - start, 1), "metrics": metrics}
    print(json.dumps(record, indent=2))
    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{Path(args.model).name}_{Path(args.csv).stem}").strip("_")
    out = ROOT / "benchmarks" / "results" / f"timeseries_long_horizon_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
