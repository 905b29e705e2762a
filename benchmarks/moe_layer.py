"""Forward and forward+backward time of the MoE layer (PyTorch path) vs a dense MLP of equal active
FLOPs and vs the naive per-expert loop (Hugging Face Mixtral style), side by side in one run.

    python benchmarks/moe_layer.py                       # CPU, writes benchmarks/results/moe_layer_cpu.json
    python benchmarks/moe_layer.py --tokens 1024 --quick  # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moezoo.layers import MLP, MoE
from moezoo.routers import TopKRouter


def naive_loop_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The per-expert loop most implementations start from (HF ``MixtralSparseMoeBlock`` style):
    route, then for every expert find its tokens with ``torch.where`` and run its MLP."""
    routing = moe.router(x)
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        idx = torch.where(routing.expert == e)[0]
        if idx.numel() == 0:
            continue
        tok = routing.token[idx]
        h = F.gelu(x[tok] @ moe.experts.w_in[e] + moe.experts.b_in[e])
        y = (h @ moe.experts.w_out[e] + moe.experts.b_out[e]) * routing.weight[idx, None]
        out.index_add_(0, tok, y)
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(tokens: int, dim: int, hidden: int, experts: int, k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    moe = MoE(dim, hidden, experts, TopKRouter(dim, experts, k=k), backend="torch")
    dense = MLP(dim, hidden * k)  # same active FLOPs per token as k experts of width `hidden`
    x = torch.randn(tokens, dim)
    xg = x.clone().requires_grad_()

    def fwd(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)
            module(xg).sum().backward()
        return run

    def naive_fwd():
        with torch.no_grad():
            naive_loop_moe(moe, x)

    def naive_fwd_bwd():
        moe.zero_grad(set_to_none=True)
        naive_loop_moe(moe, xg).sum().backward()

    result = {"tokens": tokens, "dim": dim, "hidden": hidden, "experts": experts, "k": k}
    for name, f, fb in (("moe", fwd(moe), fwd_bwd(moe)), ("dense", fwd(dense), fwd_bwd(dense)),
                        ("naive_loop", naive_fwd, naive_fwd_bwd)):
        result[f"{name}_fwd_s"] = timeit(f, repeats)
        result[f"{name}_fwd_bwd_s"] = timeit(fb, repeats)
    for name in ("moe", "naive_loop"):
        result[f"{name}_fwd_vs_dense"] = result[f"{name}_fwd_s"] / result["dense_fwd_s"]
        result[f"{name}_fwd_bwd_vs_dense"] = result[f"{name}_fwd_bwd_s"] / result["dense_fwd_bwd_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="only E=8, k=2")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_layer_cpu.json")
    args = parser.parse_args()

    grid = [(8, 2)] if args.quick else [(e, k) for e in (8, 64) for k in (1, 2, 8)]
    rows = []
    for experts, k in grid:
        row = bench_case(args.tokens, args.dim, args.hidden, experts, k, args.repeats)
        rows.append(row)
        print(
            f"E={experts:3d} k={k}: fwd {row['moe_fwd_s'] * 1e3:7.1f} ms ({row['moe_fwd_vs_dense']:.2f}x dense, "
            f"naive {row['naive_loop_fwd_vs_dense']:.2f}x) | fwd+bwd {row['moe_fwd_bwd_s'] * 1e3:7.1f} ms "
            f"({row['moe_fwd_bwd_vs_dense']:.2f}x dense, naive {row['naive_loop_fwd_bwd_vs_dense']:.2f}x)",
            flush=True,
        )
    report = {
        "benchmark": "moe_layer",
        "command": "python benchmarks/moe_layer.py" + (" --quick" if args.quick else ""),
        "device": f"cpu: {cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "dtype": "float32",
        "target": "E=8, k=2 forward+backward within 1.25x of the dense-equivalent time",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
