"""Speed and memory of the expert computation: moezoo's Triton and torch backends against a dense MLP
with the same active FLOPs (cuBLAS), and optional peers (ScatterMoE, MegaBlocks).

    python benchmarks/kernels.py --device cuda --dtype bf16 --shapes all --time-budget 240
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu --shapes tiny --tokens 32 --warmup 0 --iters 1

For every shape: forward and forward+backward time (median over ``--iters`` after ``--warmup``;
CUDA events on the GPU), TFLOP/s (forward 2*A*D*W + 2*A*H*Dout, forward+backward three times
that), and peak memory above what was allocated before the call, with and without the method's
parameter gradients (a MoE has E/k times the dense layer's parameters, so its gradients alone
would decide a comparison of the totals). Routing is uniform random top-k (balanced in
expectation). The JSON is rewritten after every method, so a run stopped by a time limit keeps
what it measured; ``--time-budget`` skips what would start after the budget is spent.

Peers load from an ignored ``peers/`` folder at the repository root when present; otherwise the
JSON says why they are missing. ScatterMoE runs on moezoo's own weights (so its output and input
gradient are compared with moezoo's); MegaBlocks keeps its own initialisation (timed only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moezoo.kernels import get_activation  # noqa: E402
from moezoo.kernels.torch_backend import expert_mlp_torch, grouped_mm_available  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    dim: int
    hidden: int
    experts: int
    k: int
    gated: bool
    activation: str
    bias: bool
    tokens: int = 16384

    @property
    def width(self) -> int:
        """Width of w_in: gate and up halves when gated."""
        return 2 * self.hidden if self.gated else self.hidden

    def flops_forward(self) -> int:
        assignments = self.tokens * self.k
        return 2 * assignments * self.dim * self.width + 2 * assignments * self.hidden * self.dim


SHAPES = {
    "mixtral": Shape(dim=4096, hidden=14336, experts=8, k=2, gated=True, activation="silu", bias=False),
    "fine_grained": Shape(dim=2048, hidden=1024, experts=64, k=8, gated=True, activation="silu", bias=False),
    "vmoe_b": Shape(dim=768, hidden=3072, experts=32, k=2, gated=False, activation="gelu", bias=True),
    "tiny_gated": Shape(dim=64, hidden=96, experts=4, k=2, gated=True, activation="silu", bias=False, tokens=256),
    "tiny_bias": Shape(dim=48, hidden=80, experts=4, k=2, gated=False, activation="gelu", bias=True, tokens=256),
}
SHAPE_SETS = {"all": ["mixtral", "fine_grained", "vmoe_b"], "tiny": ["tiny_gated", "tiny_bias"]}

# A method builds, from the problem, a function of the input rows returning the output rows, and the
# tensors it differentiates that are not in the problem (its own parameters).
Runner = tuple[Callable[[Tensor], Tensor], list[Tensor]]
Method = Callable[["Shape", dict[str, Tensor]], Runner]


def make_problem(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """Expert weights (std 1/sqrt(fan_in)), input rows and a uniform random top-k routing.

    ``topk_weights`` (T, k) fp32 is a leaf, so every method also computes the router's gradient.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def param(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype).requires_grad_()

    topk = torch.rand(shape.tokens, shape.experts, generator=g, device=device).topk(shape.k, dim=1)
    topk_weights = torch.softmax(torch.randn(shape.tokens, shape.k, generator=g, device=device), dim=1)
    problem = {
        "x": torch.randn(shape.tokens, shape.dim, generator=g, device=device).to(dtype),
        "w_in": param(shape.experts, shape.dim, shape.width, std=shape.dim**-0.5),
        "w_out": param(shape.experts, shape.hidden, shape.dim, std=shape.hidden**-0.5),
        # choice-major flat assignments, as moezoo's routers emit them
        "token": torch.arange(shape.tokens, device=device).repeat(shape.k),
        "expert": topk.indices.t().reshape(-1),
        "topk_indices": topk.indices,
        "topk_weights": topk_weights.requires_grad_(),
    }
    if shape.bias:
        problem["b_in"] = param(shape.experts, shape.width, std=0.02)
        problem["b_out"] = param(shape.experts, shape.dim, std=0.02)
    return problem


def _moezoo(backend: Callable[..., Tensor]) -> Method:
    def build(shape: Shape, p: dict[str, Tensor]) -> Runner:
        def run(x: Tensor) -> Tensor:
            weight = p["topk_weights"].t().reshape(-1)  # choice-major, as token and expert
            return backend(x, p["token"], p["expert"], weight, p["w_in"], p["w_out"], shape.activation,
                           b_in=p.get("b_in"), b_out=p.get("b_out"), gated=shape.gated)
        return run, []
    return build


def _dense(shape: Shape, p: dict[str, Tensor]) -> Runner:
    """One MLP of hidden k*h on every token: the active FLOPs of the MoE, run by cuBLAS."""
    hidden = shape.k * shape.hidden
    width = 2 * hidden if shape.gated else hidden
    x = p["x"]
    w_in = (torch.randn(shape.dim, width, device=x.device) * shape.dim**-0.5).to(x.dtype).requires_grad_()
    w_out = (torch.randn(hidden, shape.dim, device=x.device) * hidden**-0.5).to(x.dtype).requires_grad_()
    b_in = torch.zeros(width, device=x.device, dtype=x.dtype, requires_grad=True) if shape.bias else None
    b_out = torch.zeros(shape.dim, device=x.device, dtype=x.dtype, requires_grad=True) if shape.bias else None
    act = get_activation(shape.activation)

    def run(rows: Tensor) -> Tensor:
        z = F.linear(rows, w_in.t(), b_in)
        if shape.gated:
            gate, up = z.chunk(2, dim=-1)
            return F.linear(act(gate) * up, w_out.t(), b_out)
        return F.linear(act(z), w_out.t(), b_out)
    return run, [t for t in (w_in, w_out, b_in, b_out) if t is not None]


def _scattermoe(shape: Shape, p: dict[str, Tensor]) -> Runner:
    """ScatterMoE's MLP holding copies of moezoo's weights.

    ScatterMoE stores (E, out, in) and splits its GLU projection as ``h, gates = chunk(2)`` with
    ``act(gates) * h``, i.e. [up | gate], where moezoo's w_in is (E, in, out) with [gate | up].
    """
    from scattermoe import mlp as scatter_mlp

    activation = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU()}[shape.activation]
    if shape.gated:
        module = scatter_mlp.GLUMLP(shape.dim, shape.hidden, shape.experts, shape.k, bias=shape.bias,
                                    activation=activation)
    else:
        module = scatter_mlp.MLP(shape.dim, shape.hidden, shape.experts, shape.k, bias=shape.bias,
                                 activation=activation)
    module = module.to(device=p["x"].device, dtype=p["x"].dtype)

    def up_first(w: Tensor) -> Tensor:
        return torch.cat([w[..., shape.hidden:], w[..., :shape.hidden]], dim=-1) if shape.gated else w

    with torch.no_grad():
        module.experts.weight.copy_(up_first(p["w_in"]).transpose(1, 2))
        module.output_experts.weight.copy_(p["w_out"].transpose(1, 2))
        if shape.bias:
            module.experts.bias.copy_(up_first(p["b_in"]))
            module.output_experts.bias.copy_(p["b_out"])
    return (lambda x: module(x, p["topk_weights"].to(x.dtype), p["topk_indices"])), list(module.parameters())


def _megablocks(shape: Shape, p: dict[str, Tensor]) -> Runner:
    from megablocks.layers import moe as megablocks_moe
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    x = p["x"]
    args = Arguments(
        hidden_size=shape.dim, ffn_hidden_size=shape.hidden, moe_num_experts=shape.experts, moe_top_k=shape.k,
        mlp_type="glu" if shape.gated else "mlp", mlp_impl="grouped", bias=False,
        activation_fn=get_activation(shape.activation), bf16=x.dtype == torch.bfloat16, fp16=x.dtype == torch.float16,
        device=x.device, moe_loss_weight=0.0,  # > 0 appends each call's load-balancing loss to a global list
    )
    module = ParallelDroplessMLP(args)
    scores = torch.zeros(shape.tokens, shape.experts, device=x.device, dtype=x.dtype)

    def run(rows: Tensor) -> Tensor:
        out = module(rows.view(shape.tokens, 1, shape.dim), scores, p["topk_weights"].to(rows.dtype), p["topk_indices"])
        megablocks_moe.clear_load_balancing_loss()  # nothing may accumulate between timed calls
        return (out[0] if isinstance(out, tuple) else out).view(shape.tokens, shape.dim)
    return run, list(module.parameters())


def _peer_notes(shape: Shape) -> dict[str, str]:
    """Known differences between a peer's computation and the benchmarked one."""
    if shape.bias:
        return {"megablocks": "run without expert biases (not supported by its MLPs)"}
    return {}


def _time_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median wall time of fn in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it, in MiB (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(runner: Runner, shape: Shape, p: dict[str, Tensor], device: str, warmup: int,
            iters: int) -> dict[str, float | None]:
    run, own_leaves = runner
    x = p["x"].detach()
    x_grad = x.clone().requires_grad_()
    grad_out = torch.randn_like(x)
    leaves = [t for t in p.values() if t.requires_grad] + own_leaves

    def forward() -> None:
        with torch.no_grad():
            run(x)

    def forward_backward() -> None:
        for leaf in [x_grad, *leaves]:
            leaf.grad = None
        run(x_grad).backward(grad_out)

    fwd_ms = _time_ms(forward, device, warmup, iters)
    fwd_bwd_ms = _time_ms(forward_backward, device, warmup, iters)
    fwd_bwd_peak = _peak_mb(forward_backward, device)
    # The parameter gradients of the last call, all allocated during it (grads were reset).
    grad_mb = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None) / 2**20
    flops = shape.flops_forward()
    return {
        "fwd_ms": fwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_peak_mem_mb": _peak_mb(forward, device),
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_bwd_tflops": 3 * flops / fwd_bwd_ms / 1e9,
        "fwd_bwd_peak_mem_mb": fwd_bwd_peak,
        "param_grad_mb": grad_mb,
        "fwd_bwd_peak_mem_without_param_grads_mb": None if fwd_bwd_peak is None else fwd_bwd_peak - grad_mb,
    }


def _torch_backend_label(shape: Shape, p: dict[str, Tensor]) -> str:
    runs = "torch._grouped_mm" if grouped_mm_available(p["x"], p["w_in"]) else "a per-expert loop of torch.mm"
    return f"moezoo torch backend: {runs}"


LABELS: dict[str, Callable[[Shape, dict[str, Tensor]], str]] = {
    "moezoo_torch": _torch_backend_label,
    "moezoo_triton": lambda shape, p: "moezoo Triton kernels",
    "dense": lambda shape, p: f"dense MLP of hidden k*H = {shape.k * shape.hidden} (cuBLAS): equal active FLOPs",
    "scattermoe": lambda shape, p: "ScatterMoE (peers/scattermoe) on moezoo's weights",
    "megablocks": lambda shape, p: "MegaBlocks dMoE, grouped GEMM, its own weights",
}

# The targets moezoo's Triton kernels are held to (bf16 forward+backward on the GPU).
TARGETS = {
    "fwd_bwd_tflops_vs_dense": ">= 0.85: throughput at least 0.85 x the dense MLP of equal active FLOPs",
    "fwd_bwd_ms_vs_scattermoe": "<= 1: no slower than ScatterMoE on the same weights",
    "fwd_bwd_peak_mem_vs_dense": "<= 1.1: peak memory without parameter gradients at most 1.1 x the dense MLP's",
}


def _targets(results: dict[str, dict], dtype: str, device: str) -> dict[str, dict[str, object]]:
    """Each target's ratio and whether it is met (None where it cannot be judged here)."""
    ours = results.get("moezoo_triton")
    dense, scatter = results.get("dense"), results.get("scattermoe")
    applies = dtype == "bf16" and device == "cuda"

    def ratio(a, b):
        return None if a is None or b is None else a / b

    values = {
        "fwd_bwd_tflops_vs_dense": ratio(ours and ours["fwd_bwd_tflops"], dense and dense["fwd_bwd_tflops"]),
        "fwd_bwd_ms_vs_scattermoe": ratio(ours and ours["fwd_bwd_ms"], scatter and scatter["fwd_bwd_ms"]),
        "fwd_bwd_peak_mem_vs_dense": ratio(ours and ours["fwd_bwd_peak_mem_without_param_grads_mb"],
                                           dense and dense["fwd_bwd_peak_mem_without_param_grads_mb"]),
    }
    bounds = {"fwd_bwd_tflops_vs_dense": lambda v: v >= 0.85, "fwd_bwd_ms_vs_scattermoe": lambda v: v <= 1.0,
              "fwd_bwd_peak_mem_vs_dense": lambda v: v <= 1.1}
    return {name: {"target": TARGETS[name], "value": value,
                   "met": bounds[name](value) if applies and value is not None else None}
            for name, value in values.items()}


def available_methods(device: str, peers_dir: Path) -> tuple[dict[str, Method], dict[str, str]]:
    """The methods that can run here, and a note for each one that cannot."""
    methods: dict[str, Method] = {"moezoo_torch": _moezoo(expert_mlp_torch), "dense": _dense}
    notes: dict[str, str] = {}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda" or interpreted:
        from moezoo.kernels.triton_backend import expert_mlp_triton

        methods["moezoo_triton"] = _moezoo(expert_mlp_triton)
    else:
        notes["moezoo_triton"] = "skipped: no CUDA device and TRITON_INTERPRET is not 1"
    if peers_dir.is_dir():
        sys.path.insert(0, str(peers_dir))
    # ScatterMoE is Triton only, so the interpreter runs it too; MegaBlocks needs its CUDA extensions.
    for name, method, module, runs_here in [("scattermoe", _scattermoe, "scattermoe", device == "cuda" or interpreted),
                                            ("megablocks", _megablocks, "megablocks", device == "cuda")]:
        if not runs_here:
            notes[name] = "skipped: needs CUDA" + ("" if name == "megablocks" else " or TRITON_INTERPRET=1")
            continue
        try:
            __import__(module)
        except Exception as error:  # any import failure of an optional peer is a note, not a crash
            notes[name] = f"not importable (looked in {peers_dir} and sys.path): {error!r}"
            continue
        methods[name] = method
    return methods, notes


def _outputs(runner: Runner, x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """(output, gradient of <output, grad_out> w.r.t. x), in fp32."""
    x = x.detach().clone().requires_grad_()
    out = runner[0](x)
    (dx,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out.detach().float(), dx.float()


def _autotuned_configs() -> dict[str, dict[str, str]]:
    """The config each autotuned moezoo kernel chose, per tuning key, so far in this process."""
    from moezoo.kernels import triton_backend

    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in vars(triton_backend).items() if name.endswith("_kernel") and hasattr(kernel, "cache")}


class Budget:
    """Wall time left for starting new measurements (``seconds=None``: no limit)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.seconds = seconds

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def bench_shape(name: str, shape: Shape, methods: dict[str, Method], base_notes: dict[str, str], device: str,
                dtype_name: str, warmup: int, iters: int, budget: Budget,
                save: Callable[[dict[str, object]], None]) -> dict[str, object]:
    """Measure every method on one shape; ``save`` is called with the partial entry after each method."""
    problem = make_problem(shape, device, DTYPES[dtype_name])
    grad_out = torch.randn(shape.tokens, shape.dim, generator=torch.Generator().manual_seed(1)).to(device)
    notes = {**base_notes, **{k: v for k, v in _peer_notes(shape).items() if k in methods}}
    results: dict[str, dict[str, object]] = {}
    agreement: dict[str, dict[str, float]] = {}
    entry = {"config": asdict(shape), "flops_forward": shape.flops_forward(), "results": results,
             "max_rel_diff_vs_moezoo_torch": agreement, "notes": notes}
    reference: tuple[Tensor, Tensor] | None = None
    for method_name, method in methods.items():
        if budget.spent():
            notes[method_name] = f"skipped: the time budget of {budget.seconds} s was spent"
            continue
        try:
            runner = method(shape, problem)
            start = time.perf_counter()
            out, dx = _outputs(runner, problem["x"], grad_out)  # also the autotuning of the Triton kernels
            first_call_s = time.perf_counter() - start
            if method_name == "moezoo_torch":
                reference = (out, dx)
            elif method_name in ("moezoo_triton", "scattermoe") and reference is not None:
                agreement[method_name] = {
                    "out": ((out - reference[0]).abs().max() / reference[0].abs().max()).item(),
                    "dx": ((dx - reference[1]).abs().max() / reference[1].abs().max()).item(),
                }
            del out, dx
            results[method_name] = {"label": LABELS[method_name](shape, problem), "first_call_s": first_call_s,
                                    **measure(runner, shape, problem, device, warmup, iters)}
            if method_name == "moezoo_triton":
                results[method_name]["autotuned"] = _autotuned_configs()
        except Exception as error:  # a failing method (e.g. a peer's API drift) is recorded, not fatal
            notes[method_name] = f"failed: {error!r}"
        print(f"  {name:13s} {method_name:14s} {results.get(method_name, notes.get(method_name))}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        dense = results.get("dense")
        for result in results.values():
            if dense:
                result["fwd_time_vs_dense"] = result["fwd_ms"] / dense["fwd_ms"]
                result["fwd_bwd_time_vs_dense"] = result["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        entry["targets"] = _targets(results, dtype_name, device)
        save(entry)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shapes", default="all", help=f"{' | '.join(SHAPE_SETS)} or a comma list of {sorted(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=None, help="override the tokens of every shape")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which no further method or shape is started (one running finishes)")
    parser.add_argument("--peers", type=Path, default=ROOT / "peers", help="folder holding scattermoe/megablocks")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available (use --device cpu --shapes tiny for a smoke run)")
    names = SHAPE_SETS.get(args.shapes, args.shapes.split(","))
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    budget = Budget(args.time_budget)
    methods, notes = available_methods(args.device, args.peers)

    import triton  # after the moezoo imports, which need it anyway on the triton path

    out = args.out or ROOT / "benchmarks" / "results" / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "warmup": args.warmup,
        "iters": args.iters,
        "time_budget_s": args.time_budget,
        "routing": "uniform random top-k per token, softmax weights",
        "targets": TARGETS,
        "shapes": {},
    }

    def save(name: str, entry: dict[str, object]) -> None:
        report["shapes"][name] = entry
        out.write_text(json.dumps(report, indent=2) + "\n")

    for name in names:
        if budget.spent():
            report.setdefault("skipped_shapes", []).append(name)
            save(name, {"notes": {"all": f"skipped: the time budget of {args.time_budget} s was spent"}})
            continue
        shape = SHAPES[name] if args.tokens is None else Shape(**{**asdict(SHAPES[name]), "tokens": args.tokens})
        print(f"{name}: {shape}", flush=True)
        bench_shape(name, shape, methods, notes, args.device, args.dtype, args.warmup, args.iters, budget,
                    lambda entry, name=name: save(name, entry))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
