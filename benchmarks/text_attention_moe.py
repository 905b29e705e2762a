"""Attention-MoE at equal parameters, tiny scale: validation perplexity, compute and attention maps of the
shipped byte-level LMs (dense 4-head baseline, its 2-head version, MoA, SwitchHead, σ-MoE MLP).

SwitchHead's claim (arXiv 2312.07987) is matching a dense Transformer's perplexity at equal parameters
with a fraction of the attention matrices; this measures it on the built-in pydoc corpus.

    python benchmarks/text_attention_moe.py                 # the shipped lm_*_pydoc entries
    python benchmarks/text_attention_moe.py --checkpoints runs/retrain   # fresh fits of the configs

With ``--checkpoints DIR`` it measures, instead of the shipped weights, the last checkpoint of
``moezoo fit --config configs/text/<entry>.yaml --trainer.default_root_dir DIR/<entry>
--trainer.logger false`` for each entry (the configs as they are today: the authors'
initialisations of issue 24, which the shipped weights predate), and writes
benchmarks/results/text_attention_moe_retrained.json.

Writes benchmarks/results/text_attention_moe.json and, per entry, the model-card study
model_cards/results/<entry>.attention_moe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import moezoo
from moezoo.layers.routed import parameter_counts
from moezoo.modalities.text.evaluate import evaluate_pydoc, forward_macs

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("lm_dense_pydoc", "lm_dense_h2_pydoc", "lm_moa_pydoc", "lm_switchhead_pydoc", "lm_sigma_moe_pydoc")
COLUMNS = ["entry", "attention", "mlp", "parameters", "active_parameters", "val_perplexity", "val_bits_per_byte",
           "macs_per_token", "attention_maps_per_sequence", "attention_maps_per_layer"]


def measure(name: str, checkpoints: Path | None = None) -> dict:
    model = moezoo.create_model(name, pretrained=checkpoints is None)
    if checkpoints is not None:
        last = max((checkpoints / name / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        moezoo.load_checkpoint(model, last)
    model.eval()
    metrics = evaluate_pydoc(model)
    length = model.context_length
    macs = forward_macs(model, torch.zeros(1, length, dtype=torch.long))
    maps = model.attention_matrices()
    return {
        "entry": name,
        "attention": model.attention_kind,
        "mlp": model.mlp_kind,
        "parameters": parameter_counts(model)["total"],
        "active_parameters": parameter_counts(model)["active"],
        "val_perplexity": metrics["perplexity"],
        "val_bits_per_byte": metrics["bits_per_byte"],
        "macs_per_token": round(macs / length),
        "attention_maps_per_sequence": maps,
        "attention_maps_per_layer": maps // model.depth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="measure the configs' fresh fits in this folder instead of the shipped weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.entries:
        rows.append(measure(name, args.checkpoints))
        r = rows[-1]
        print(f"{name:22s} params {r['parameters']:>8,} active {r['active_parameters']:>8,}  ppl {r['val_perplexity']:.4f}  "
              f"bpb {r['val_bits_per_byte']:.4f}  MACs/token {r['macs_per_token']:,.0f}  maps/layer "
              f"{r['attention_maps_per_layer']}", flush=True)
    command = "python benchmarks/text_attention_moe.py" + (f" --checkpoints {args.checkpoints}" if args.checkpoints else "")
    record = {
        "title": "Attention-MoE at equal parameters (tiny byte-level LMs, pydoc corpus)",
        "command": command,
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "context_length": 128,
        "notes": ("Validation split of the built-in corpus (every 10th pydoc topic from the 4th), shipped float16 "
                  "weights evaluated in float32. MACs per token: one forward of a 128-token sequence / 128 "
                  "(matrix products as executed plus the full T x T attention maps). Each model trained by its "
                  "config for 600 steps of 16 x 128 bytes."),
        "columns": COLUMNS,
        "rows": rows,
    }
    if args.checkpoints is not None:
        record["notes"] = record["notes"].replace("shipped float16 weights evaluated in float32",
                                                  "each config's final fp32 checkpoint of a fresh fit")
        out = ROOT / "benchmarks" / "results" / "text_attention_moe_retrained.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
        return
    out = ROOT / "benchmarks" / "results" / "text_attention_moe.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    study = {k: record[k] for k in ("title", "command", "columns", "rows")}
    study["summary"] = ("All five models measured by the same script; the dense 4-head model is the parameter-matched "
                        "baseline, the dense 2-head model has SwitchHead's number of attention maps.")
    for name in args.entries:
        (ROOT / "model_cards" / "results" / f"{name}.attention_moe.json").write_text(json.dumps(study, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
