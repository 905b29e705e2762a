"""Forward+backward time of a transformers MoE block converted by ``moezoo.from_transformers`` (moezoo's
expert bank, torch backend) against the same block unconverted, with transformers' own ``eager`` (a loop
over the experts) and ``grouped_mm`` (its default) experts implementations, on the same weights and
inputs, interleaved in one run: a Mixtral-architecture block (8 experts, top-2) and a
DeepSeek-V3-architecture block (64 experts, top-6 within 4 of 8 groups, 2 shared experts).

    python benchmarks/hf_moe_layer.py           # CPU, writes benchmarks/results/hf_moe_layer_cpu.json
    python benchmarks/hf_moe_layer.py --quick   # smoke run

Uses the interleaved timing of benchmarks/moe_layer.py (rounds in rotated order; ratios are medians
of per-round ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from moe_layer import cpu_name, interleaved

import moezoo

ARCHITECTURES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=1024),
    "deepseek_v3": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=2,
                        moe_intermediate_size=256, intermediate_size=1024, first_k_dense_replace=0,
                        kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32),
}


def blocks(model_type: str, dim: int) -> dict[str, torch.nn.Module]:
    """The first sparse block of a one-layer model of ``model_type``: unconverted with each experts
    implementation, and converted (all three on the same weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=32, hidden_size=dim, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    grouped = copy.deepcopy(eager)
    grouped.set_experts_implementation("grouped_mm")
    converted = moezoo.from_transformers(copy.deepcopy(eager), backend="torch")
    return {name: m.model.layers[0].mlp.train() for name, m in
            (("eager", eager), ("grouped_mm", grouped), ("moezoo", converted))}


def bench(model_type: str, tokens: int, dim: int, repeats: int) -> dict:
    layers = blocks(model_type, dim)
    x = torch.randn(1, tokens, dim)
    grad = torch.randn(1, tokens, dim)

    def fwd_bwd(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_()
            layer(inputs).backward(grad)
        return run

    runs = {name: fwd_bwd(layer) for name, layer in layers.items()}
    with torch.no_grad():
        outputs = {name: layer(x) for name, layer in layers.items()}
    diff = max((outputs[n] - outputs["eager"]).abs().max().item() for n in outputs)
    # max_slowdown: transformers' eager experts at 64 experts are far slower and still timed.
    times, _ = interleaved(runs, repeats, 2, max_slowdown=1e9)
    median = {name: statistics.median(t) for name, t in times.items()}

    def ratio(ref: str) -> float:
        return statistics.median(a / b for a, b in zip(times["moezoo"], times[ref]))

    return {
        "architecture": model_type, "tokens": tokens, "dim": dim, **ARCHITECTURES[model_type],
        "max_abs_output_difference": diff,
        **{f"{name}_fwd_bwd_s": t for name, t in median.items()},
        "moezoo_vs_eager": ratio("eager"),
        "moezoo_vs_grouped_mm": ratio("grouped_mm"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_moe_layer_cpu.json")
    args = parser.parse_args()
    tokens, repeats = (512, 2) if args.quick else (args.tokens, args.repeats)
    rows = []
    for model_type in ARCHITECTURES:
        row = bench(model_type, tokens, args.dim, repeats)
        rows.append(row)
        print(f"{model_type:12s} fwd+bwd: eager {row['eager_fwd_bwd_s'] * 1e3:7.1f} ms, grouped_mm "
              f"{row['grouped_mm_fwd_bwd_s'] * 1e3:7.1f} ms, moezoo {row['moezoo_fwd_bwd_s'] * 1e3:7.1f} ms "
              f"({row['moezoo_vs_eager']:.2f}x eager, {row['moezoo_vs_grouped_mm']:.2f}x grouped_mm); "
              f"max |output difference| {row['max_abs_output_difference']:.1e}", flush=True)
    report = {
        "benchmark": "hf_moe_layer",
        "command": "python benchmarks/hf_moe_layer.py" + (" --quick" if args.quick else ""),
        "device": f"cpu: {cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "dtype": "float32",
        "measure": "forward+backward of one block (training mode): median seconds, and medians of per-round ratios over interleaved rounds",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
