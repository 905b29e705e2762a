"""Expert parallelism on CPU processes (gloo): rows moved by all-to-all per step and time of a
forward+backward of one MoE layer, expert-parallel vs every rank running all experts itself; plus
the all-to-all volume per MoE layer at the papers' scales (arithmetic, no run).

    python benchmarks/expert_parallel.py            # 2 and 4 processes, writes benchmarks/results/expert_parallel_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moezoo.layers import MoE
from moezoo.layers.expert_parallel import init_expert_parallel, shard_experts
from moezoo.routers import TopKRouter

OUT = Path(__file__).parent / "results" / "expert_parallel_cpu.json"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(layer: MoE, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        layer(x).sum().backward()
        dist.barrier()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    experts = args.experts_per_rank * world
    layer = MoE(args.dim, args.hidden, experts, TopKRouter(args.dim, experts, k=args.k))
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
    replicated = _timed(copy.deepcopy(layer), x, args.repeats)
    shard_experts(layer, init_expert_parallel(world))
    sharded = _timed(layer, x, args.repeats)
    routing = layer.router(x)
    owners = torch.div(routing.expert, args.experts_per_rank, rounding_mode="floor")
    moved = int((owners != rank).sum())  # rows leaving this rank in one dispatch
    totals = torch.tensor([moved, routing.num_assignments], dtype=torch.float64)
    dist.all_reduce(totals)
    if rank == 0:
        queue.put({
            "processes": world, "experts": experts, "tokens_per_rank": args.tokens, "dim": args.dim,
            "hidden": args.hidden, "k": args.k,
            "rows_sent_to_other_ranks_per_dispatch": int(totals[0]),
            "share_of_assignments_moved": float(totals[0] / totals[1]),
            # dispatch + combine in the forward, their gradients in the backward
            "bytes_moved_per_fwd_bwd_step_fp32": int(totals[0]) * args.dim * 4 * 4,
            "expert_parallel_fwd_bwd_s": sharded,
            "replicated_experts_fwd_bwd_s": replicated,
        })
    dist.destroy_process_group()


def paper_scale_estimates() -> list[dict]:
    """All-to-all bytes per device per MoE layer and training step (dispatch + combine, forward and
    backward = 4 transfers) for bf16 activations with uniform routing over P expert-parallel devices:
    ``4 * tokens_per_device * k * C * d * 2 bytes * (P - 1) / P`` (capacity C pads every expert
    buffer, so C-scaled slots travel whether filled or not in dense-dispatch implementations)."""
    rows = []
    for name, d, k, c, tokens, p in (
        ("V-MoE-B/16, 32 experts (k=2, C=1.05), 4096 images x 197 tokens over 32 devices", 768, 2, 1.05, 4096 * 197 // 32, 32),
        ("V-MoE-L/16, 32 experts (k=2, C=1.05), 4096 images x 197 tokens over 32 devices", 1024, 2, 1.05, 4096 * 197 // 32, 32),
        ("V-MoE-H/14, 32 experts (k=2, C=1.05), 4096 images x 257 tokens over 32 devices", 1280, 2, 1.05, 4096 * 257 // 32, 32),
        ("Mixtral-like d=4096, 8 experts (k=2), 16k tokens per device over 8 devices", 4096, 2, 1.0, 16384, 8),
    ):
        per_transfer = tokens * k * c * d * 2 * (p - 1) / p
        rows.append({"setting": name, "tokens_per_device": tokens, "bytes_per_transfer": int(per_transfer),
                     "bytes_per_layer_step": int(4 * per_transfer),
                     "GiB_per_layer_step": round(4 * per_transfer / 2**30, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = []
    for world in args.processes:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(world, _port(), args, queue), nprocs=world, join=True)
        row = queue.get()
        results.append(row)
        print(f"{world} processes: {row['rows_sent_to_other_ranks_per_dispatch']} rows moved per dispatch "
              f"({row['share_of_assignments_moved']:.0%} of assignments), fwd+bwd "
              f"{row['expert_parallel_fwd_bwd_s'] * 1e3:.1f} ms expert-parallel vs "
              f"{row['replicated_experts_fwd_bwd_s'] * 1e3:.1f} ms with all experts on every rank", flush=True)
    report = {
        "benchmark": "expert_parallel",
        "command": "python benchmarks/expert_parallel.py",
        "device": f"cpu, {os.cpu_count()} cores, gloo, 1 thread per process",
        "note": "more processes than cores oversubscribe the CPU; times show overheads, not GPU scaling",
        "runs": results,
        "paper_scale_estimates": paper_scale_estimates(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
