"""PEER on the CPU: forward+backward time and peak memory against two dense MLPs, in one run.

* ``peer``: :class:`moezoo.layers.PEER`, N = n^2 single-neuron experts, h heads retrieving k each.
* ``dense_active``: ``moezoo.layers.MLP`` of hidden ``h * k``, the expert parameters a token uses.
* ``dense_total``: ``MLP`` of hidden N, as many expert parameters as PEER holds.

Time: each round runs every method once in a rotated order; a ratio is the median over rounds of
the per-round ratio to PEER, so load from other processes that drifts between rounds cancels.
Memory: each method runs in a fresh subprocess an identical warm-up step, frees its gradients,
resets the kernel's peak resident set (Linux ``/proc/self/clear_refs``) and runs one forward+backward;
its peak is the rise of that peak over the resident set just before the step (weights, input and
library state excluded; activations, gradients and temporaries included).

    python benchmarks/peer.py               # writes benchmarks/results/peer_cpu.json
    python benchmarks/peer.py --experts 1024 --tokens 128 --repeats 2 --out /tmp/peer.json   # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moezoo.layers import MLP, PEER, parameter_counts

METHODS = ("peer", "dense_active", "dense_total")


def build(method: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if method == "peer":
        return PEER(args.dim, args.experts, heads=args.heads, k=args.k, key_dim=args.key_dim)
    hidden = args.heads * args.k if method == "dense_active" else args.experts
    return MLP(args.dim, hidden, "gelu")


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    module(x).square().mean().backward()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(method: str, args: argparse.Namespace) -> int:
    """Run in a fresh process (see the module docstring); bytes."""
    module, x = build(method, args), torch.randn(args.tokens, args.dim)
    # The same step first, so that the libraries' one-off allocations are not counted; its gradients
    # are freed and handed back to the OS.
    step(module, x)
    module.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Reset the kernel's peak resident set (VmHWM), which otherwise holds the imports' peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = resident_bytes()
    step(module, x)
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return peak_kib * 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=128**2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--key-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)  # the subprocess mode
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peer_cpu.json")
    args = parser.parse_args()
    if args.memory_of:
        print(peak_memory(args.memory_of, args))
        return

    modules = {m: build(m, args) for m in METHODS}
    x = torch.randn(args.tokens, args.dim)
    for module in modules.values():  # warm-up
        step(module, x)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for m in METHODS[r % 3:] + METHODS[:r % 3]:
            start = time.perf_counter()
            step(modules[m], x)
            times[m].append(time.perf_counter() - start)
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("dim", "experts", "heads", "k", "key_dim", "tokens")]
    memory = {}
    for m in METHODS:
        out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", m], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        memory[m] = int(out.stdout.split()[-1])
    record = {
        "benchmark": "peer_cpu",
        "command": "python benchmarks/peer.py",
        "config": {k: getattr(args, k) for k in ("dim", "experts", "heads", "k", "key_dim", "tokens", "repeats")},
        "parameters": {m: parameter_counts(modules[m]) for m in METHODS},
        "forward_backward_ms_median": {m: round(1e3 * statistics.median(times[m]), 2) for m in METHODS},
        "time_ratio_to_peer_median": {
            m: round(statistics.median(a / b for a, b in zip(times[m], times["peer"])), 3) for m in METHODS},
        "peak_step_memory_mib": {m: round(v / 2**20, 1) for m, v in memory.items()},
        "memory_ratio_to_peer": {m: round(memory[m] / max(memory["peer"], 1), 3) for m in METHODS},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
