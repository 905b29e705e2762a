"""Speed and memory of the expert computation: moezoo's Triton and torch backends against a dense MLP
with the same active FLOPs (cuBLAS), and optional peers (ScatterMoE, MegaBlocks).

    python benchmarks/kernels.py --device cuda --dtype bf16 --shapes all
    python benchmarks/kernels.py --device cpu --shapes tiny --out /tmp/kernels_cpu.json   # smoke check

For every shape: forward and forward+backward time (median over ``--iters`` after ``--warmup``;
CUDA events on the GPU), TFLOP/s (forward 2*A*D*W + 2*A*H*Dout, forward+backward three times
that), and peak memory above what was allocated before the call (parameter gradients included).
Routing is uniform random top-k (balanced in expectation). Peers load from an ignored ``peers/``
folder at the repository root when present; otherwise the JSON says why they are missing.
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
from moezoo.kernels.torch_backend import expert_mlp_torch  # noqa: E402

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
    from scattermoe import mlp as scatter_mlp

    if shape.gated:
        module = scatter_mlp.GLUMLP(shape.dim, shape.hidden, shape.experts, shape.k, activation=torch.nn.SiLU())
    else:
        module = scatter_mlp.MLP(shape.dim, shape.hidden, shape.experts, shape.k, bias=shape.bias,
                                 activation=torch.nn.GELU())
    module = module.to(device=p["x"].device, dtype=p["x"].dtype)
    return (lambda x: module(x, p["topk_weights"].to(x.dtype), p["topk_indices"])), list(module.parameters())


def _megablocks(shape: Shape, p: dict[str, Tensor]) -> Runner:
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    x = p["x"]
    args = Arguments(
        hidden_size=shape.dim, ffn_hidden_size=shape.hidden, moe_num_experts=shape.experts, moe_top_k=shape.k,
        mlp_type="glu" if shape.gated else "mlp", mlp_impl="grouped", bias=False,
        activation_fn=get_activation(shape.activation), bf16=x.dtype == torch.bfloat16, fp16=x.dtype == torch.float16,
        device=x.device,
    )
    module = ParallelDroplessMLP(args)
    scores = torch.zeros(shape.tokens, shape.experts, device=x.device, dtype=x.dtype)

    def run(rows: Tensor) -> Tensor:
        out = module(rows.view(shape.tokens, 1, shape.dim), scores, p["topk_weights"].to(rows.dtype), p["topk_indices"])
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
    flops = shape.flops_forward()
    return {
        "fwd_ms": fwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_peak_mem_mb": _peak_mb(forward, device),
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_bwd_tflops": 3 * flops / fwd_bwd_ms / 1e9,
        "fwd_bwd_peak_mem_mb": _peak_mb(forward_backward, device),
    }


def available_methods(device: str, peers_dir: Path) -> tuple[dict[str, Method], dict[str, str]]:
    """The methods that can run here, and a note for each one that cannot."""
    methods: dict[str, Method] = {"moezoo_torch": _moezoo(expert_mlp_torch), "dense": _dense}
    notes: dict[str, str] = {}
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from moezoo.kernels.triton_backend import expert_mlp_triton

        methods["moezoo_triton"] = _moezoo(expert_mlp_triton)
    else:
        notes["moezoo_triton"] = "skipped: no CUDA device and TRITON_INTERPRET is not 1"
    if peers_dir.is_dir():
        sys.path.insert(0, str(peers_dir))
    for name, method, module in [("scattermoe", _scattermoe, "scattermoe"), ("megablocks", _megablocks, "megablocks")]:
        if device != "cuda":
            notes[name] = "skipped: CUDA only"
            continue
        try:
            __import__(module)
        except Exception as error:  # any import failure of an optional peer is a note, not a crash
            notes[name] = f"not importable (looked in {peers_dir} and sys.path): {error!r}"
            continue
        methods[name] = method
    return methods, notes


def bench_shape(name: str, shape: Shape, methods: dict[str, Method], base_notes: dict[str, str], device: str,
                dtype: torch.dtype, warmup: int, iters: int) -> dict[str, object]:
    problem = make_problem(shape, device, dtype)
    notes = {**base_notes, **{k: v for k, v in _peer_notes(shape).items() if k in methods}}
    results: dict[str, dict[str, float | None]] = {}
    outputs: dict[str, Tensor] = {}
    for method_name, method in methods.items():
        try:
            runner = method(shape, problem)
            with torch.no_grad():
                outputs[method_name] = runner[0](problem["x"]).float()
            results[method_name] = measure(runner, shape, problem, device, warmup, iters)
        except Exception as error:  # a failing method (e.g. a peer's API drift) is recorded, not fatal
            notes[method_name] = f"failed: {error!r}"
        print(f"  {name:13s} {method_name:14s} {results.get(method_name, notes.get(method_name))}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    dense = results.get("dense")
    if dense:
        for result in results.values():
            result["fwd_time_vs_dense"] = result["fwd_ms"] / dense["fwd_ms"]
            result["fwd_bwd_time_vs_dense"] = result["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
    agreement = {}
    if "moezoo_torch" in outputs:
        reference = outputs["moezoo_torch"]
        scale = reference.abs().max().item()
        for method_name in ("moezoo_triton", "scattermoe"):
            if method_name in outputs:
                agreement[method_name] = (outputs[method_name] - reference).abs().max().item() / scale
    return {
        "config": asdict(shape),
        "flops_forward": shape.flops_forward(),
        "results": results,
        "max_rel_diff_vs_moezoo_torch": agreement,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shapes", default="all", help=f"{' | '.join(SHAPE_SETS)} or a comma list of {sorted(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=None, help="override the tokens of every shape")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
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
    dtype = DTYPES[args.dtype]
    methods, notes = available_methods(args.device, args.peers)

    import triton  # after the moezoo imports, which need it anyway on the triton path

    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "iters": args.iters,
        "routing": "uniform random top-k per token, softmax weights",
        "shapes": {},
    }
    for name in names:
        shape = SHAPES[name] if args.tokens is None else Shape(**{**asdict(SHAPES[name]), "tokens": args.tokens})
        print(f"{name}: {shape}", flush=True)
        report["shapes"][name] = bench_shape(name, shape, methods, notes, args.device, dtype, args.warmup, args.iters)

    out = args.out or ROOT / "benchmarks" / "results" / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
