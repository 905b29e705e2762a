"""The MoE layer on the CPU (PyTorch expert path) against the best real peer and a dense MLP, in one
interleaved run.

Methods, all SwiGLU experts without biases on the same weights and the same routing decisions:

* ``moezoo``: ``moezoo.layers.MoE`` with a Mixtral router (``TopKRouter(normalize=True)``: softmax
  over all experts, top-k, renormalised), ``backend="torch"``.
* ``hf_eager`` / ``hf_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with
  ``config._experts_implementation`` set to ``"eager"`` (its per-expert loop) or ``"grouped_mm"``
  (``torch._grouped_mm``, transformers' default), moezoo's router and expert weights copied in.
* ``dense``: ``moezoo.layers.MLP`` of hidden ``k * hidden``: the same active expert FLOPs.
* ``*_experts``: the expert computation alone, without the routers (whose costs differ), on one
  fixed routing: ``moezoo.kernels.expert_mlp`` and the transformers block's ``experts`` module.

Every MoE's output and input gradient are checked against moezoo's before timing. Each timed round
runs every method once, in a rotated order; a ratio is the median over rounds of the per-round
time ratio, so load from other processes that drifts between rounds cancels. A method slower than
``--max-slowdown`` times moezoo's layer in the warm-up rounds is not timed further (transformers'
eager experts at E=64 take tens of seconds: indexing ``gate_up_proj[e]`` gives every expert a
gradient of the whole weight stack); its ratio then comes from the warm-up rounds and says so.

    python benchmarks/moe_layer.py                       # writes benchmarks/results/moe_layer_cpu.json
    python benchmarks/moe_layer.py --cases 8x2 --repeats 3 --out /tmp/moe_layer.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moezoo.kernels import expert_mlp
from moezoo.layers import MLP, MoE
from moezoo.routers import Routing, TopKRouter

PEERS = ("hf_eager", "hf_grouped_mm")
LAYERS = ("moezoo", *PEERS, "dense")
EXPERTS = tuple(f"{name}_experts" for name in ("moezoo", *PEERS))
GRID = [(e, k) for e in (8, 64) for k in (1, 2, 8)]


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"8x2,64x2"`` -> ``[(8, 2), (64, 2)]``."""
    cases = []
    for item in text.split(","):
        experts, _, k = item.partition("x")
        if not (experts.isdigit() and k.isdigit()) or not 1 <= int(k) <= int(experts):
            raise argparse.ArgumentTypeError(f"cases: {item!r} is not EXPERTSxK with 1 <= K <= EXPERTS")
        cases.append((int(experts), int(k)))
    return cases


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def build(dim: int, hidden: int, experts: int, k: int) -> dict[str, nn.Module]:
    """The four layers, sharing moezoo's randomly initialised router and expert weights."""
    torch.manual_seed(0)
    moe = MoE(dim, hidden, experts, TopKRouter(dim, experts, k=k, normalize=True), activation="silu",
              gated=True, bias=False, backend="torch")
    layers: dict[str, nn.Module] = {"moezoo": moe}
    for name in PEERS:
        config = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
                               num_experts_per_tok=k, hidden_act="silu", router_jitter_noise=0.0)
        config._experts_implementation = name.removeprefix("hf_")
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.gate.weight)
            # moezoo: w_in (E, dim, [gate | up]), w_out (E, hidden, dim); transformers stores the
            # transposes, gate_up_proj (E, [gate; up], dim) and down_proj (E, dim, hidden).
            block.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
            block.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))
        layers[name] = block
    layers["dense"] = MLP(dim, hidden * k, "silu", gated=True, bias=False)
    return layers


def expert_calls(layers: dict[str, nn.Module], x: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """The expert computations alone, ``(tokens, dim) -> (tokens, dim)``, on the routing of ``x`` by
    transformers' router (moezoo's picks the same experts: checked by :func:`check_agreement`)."""
    with torch.no_grad():
        _, top_weight, top_index = layers["hf_grouped_mm"].gate(x.reshape(-1, x.shape[-1]))
    top_weight.requires_grad_()  # so that every method also computes the routing weights' gradient
    tokens, k = top_index.shape
    moe = layers["moezoo"]
    routing = Routing(torch.arange(tokens).repeat_interleave(k), top_index.reshape(-1), top_weight.reshape(-1),
                      tokens, moe.num_experts)

    def moezoo(rows: Tensor) -> Tensor:
        return expert_mlp(rows, routing, moe.experts.w_in, moe.experts.w_out, "silu", gated=True, backend="torch")

    calls = {"moezoo_experts": moezoo}
    for name in PEERS:
        calls[f"{name}_experts"] = lambda rows, experts=layers[name].experts: experts(rows, top_index, top_weight)
    return calls


def check_agreement(layers: dict[str, nn.Module], calls: dict[str, Callable[[Tensor], Tensor]], x: Tensor,
                    grad: Tensor) -> dict[str, float]:
    """Max abs difference of each MoE's output and input gradient from moezoo's; raises if they differ."""
    runs = {name: layers[name] for name in ("moezoo", *PEERS)} | calls
    results = {}
    for name, run in runs.items():
        xi = x.clone().requires_grad_()
        out = run(xi if name in layers else xi.view(-1, x.shape[-1])).view(x.shape)
        out.backward(grad)
        results[name] = (out.detach(), xi.grad)
    diffs = {}
    for name in runs:
        ref_out, ref_grad = results["moezoo_experts" if name.endswith("_experts") else "moezoo"]
        out, x_grad = results[name]
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name} output: {m}")
        torch.testing.assert_close(x_grad, ref_grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name} grad: {m}")
        diffs[name] = max((out - ref_out).abs().max().item(), (x_grad - ref_grad).abs().max().item())
    torch.testing.assert_close(results["moezoo"][0], results["moezoo_experts"][0], rtol=1e-4, atol=1e-5)
    return diffs


def saved_activation_mib(run: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor]) -> float:
    """MiB of tensors autograd saves for the backward of one forward, parameters and input excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x)
    return sum(seen.values()) / 2**20


def interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmup: int,
                max_slowdown: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each timed method per round (round r starts at the r-th method, in rotation), and
    the warm-up median of the methods left out of the rounds for being over ``max_slowdown`` times
    slower than moezoo's layer."""
    warm: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(warmup):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            warm[name].append(time.perf_counter() - start)
    limit = max_slowdown * statistics.median(warm["moezoo"])
    slow = {name: statistics.median(t) for name, t in warm.items() if statistics.median(t) > limit}
    names = [name for name in runs if name not in slow]
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times, slow


def bench_case(tokens: int, dim: int, hidden: int, experts: int, k: int, args: argparse.Namespace) -> dict:
    layers = build(dim, hidden, experts, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, dim, generator=g)
    grad = torch.randn(1, tokens, dim, generator=g)
    calls = expert_calls(layers, x)
    max_diff = check_agreement(layers, calls, x, grad)
    params = {name: list(layer.parameters()) for name, layer in layers.items()}
    for name in EXPERTS:
        params[name] = params[name.removesuffix("_experts")]
    runs = {name: layers[name] for name in LAYERS} | {
        name: lambda v, call=calls[name]: call(v.view(-1, dim)) for name in EXPERTS}
    xg = x.clone().requires_grad_()

    def fwd(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                runs[name](x)
        return run

    def fwd_bwd(name: str) -> Callable[[], None]:
        def run() -> None:
            for p in params[name]:
                p.grad = None
            xg.grad = None
            runs[name](xg).view(grad.shape).backward(grad)
        return run

    row = {"tokens": tokens, "dim": dim, "hidden": hidden, "experts": experts, "k": k,
           "max_abs_diff_vs_moezoo": max_diff, "load_average_before": load_average()}
    for mode, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        times, slow = interleaved({name: make(name) for name in runs}, args.repeats, args.warmup, args.max_slowdown)
        median = {name: statistics.median(t) for name, t in times.items()} | slow

        def ratio(name: str, ref: str, times: dict = times, median: dict = median) -> float:
            if name in times and ref in times:
                return statistics.median(a / b for a, b in zip(times[name], times[ref]))
            return median[name] / median[ref]

        row[mode] = {
            "median_s": median,
            "warmup_only": sorted(slow),
            "layer_vs_best_peer": ratio("moezoo", min(PEERS, key=median.__getitem__)),
            "layer_best_peer": min(PEERS, key=median.__getitem__),
            "layer_vs_dense": ratio("moezoo", "dense"),
            "experts_vs_best_peer": ratio("moezoo_experts", min(EXPERTS[1:], key=median.__getitem__)),
            "experts_best_peer": min(EXPERTS[1:], key=median.__getitem__),
            "moezoo_vs": {name: ratio("moezoo", name) for name in LAYERS[1:]}
            | {name: ratio("moezoo_experts", name) for name in EXPERTS[1:]},
        }
    row["saved_activations_mib"] = {name: saved_activation_mib(runs[name], xg, params[name]) for name in runs}
    row["load_average_after"] = load_average()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per case and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per case and mode")
    parser.add_argument("--max-slowdown", type=float, default=5.0,
                        help="methods slower than this times moezoo's layer in warm-up are not timed further")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--cases", type=parse_cases, default=GRID,
                        help="comma-separated EXPERTSxK, e.g. 8x2,64x2 (default: E in 8, 64 x k in 1, 2, 8)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_layer_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report = {
        "benchmark": "moe_layer",
        "command": "python benchmarks/moe_layer.py " + " ".join(
            f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in ("out", "cases"))
            + " --cases=" + ",".join(f"{e}x{k}" for e, k in args.cases),
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "experts": "SwiGLU, no biases; Mixtral routing (softmax, top-k, renormalised); same weights in every MoE",
        "ratio": "median over interleaved rounds of time(moezoo) / time(other); < 1 means moezoo is faster",
        "targets": "fwd_bwd layer_vs_best_peer <= 1.0 at E=8, k=2 and E=64, k=2; fwd_bwd layer_vs_dense <= 1.25 "
                   "at E=8, k=2",
        "rows": [],
    }
    for experts, k in args.cases:
        row = bench_case(args.tokens, args.dim, args.hidden, experts, k, args)
        report["rows"].append(row)
        f, fb = row["fwd"], row["fwd_bwd"]
        print(
            f"E={experts:3d} k={k}: fwd {f['layer_vs_best_peer']:.2f}x {f['layer_best_peer']}, "
            f"{f['layer_vs_dense']:.2f}x dense, experts {f['experts_vs_best_peer']:.2f}x | fwd+bwd "
            f"{fb['layer_vs_best_peer']:.2f}x {fb['layer_best_peer']}, {fb['layer_vs_dense']:.2f}x dense, experts "
            f"{fb['experts_vs_best_peer']:.2f}x | load {row['load_average_after']}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
