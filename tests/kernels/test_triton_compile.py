"""Every Triton expert kernel compiled ahead of time for sm_80 and sm_90, on a machine without a GPU.

The interpreter checks the kernels' numerics but nothing a GPU launch needs: that ``tl.dot`` lowers
for the target, that a config fits the shared memory of one block, that ptxas does not spill. This
module compiles what the host code really launches:

* :func:`recorded_launches` runs :func:`expert_mlp_triton` forward and backward on meta tensors of
  the benchmark shapes with every ``*_kernel`` replaced by a recorder, so the flags, dtypes and
  strides compiled here are those of the launches;
* :func:`specialise` turns a launch into Triton's signature, constants and attributes with the
  launcher's own ``native_specialize_impl`` (16-byte divisibility, integers equal to 1 as
  constants, None pointers);
* :func:`compile_config` compiles it with ptxas for a target and one autotune config, reading
  registers and spills from ptxas's ``-v`` log and the pipelined operand buffers from the TTGIR.

For each target the configs are those the kernel's own pruning keeps there
(``early_config_prune.rejection``). The default test compiles one kept config per kernel, mode and
target (the one with the largest shared-memory footprint, which is the most likely to spill),
rotating over each kernel's launches so every flag combination is compiled; the slow sweep
compiles every kept config of every launch. Run directly to write a report, e.g. the measurements
the pruning rules come from (every candidate, the pruned ones too)::

    TRITON_INTERPRET=0 python tests/kernels/test_triton_compile.py --sweep candidates \
        --json benchmarks/results/triton_compile_candidates.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# name -> (compute capability, shared memory per block in bytes: the opt-in maximum of the device)
TARGETS = {"sm80": (80, 166912), "sm90": (90, 232448)}
# name -> (dtype name, torch.get_float32_matmul_precision() during the launch)
MODES = {"bf16": ("bfloat16", "highest"), "fp16": ("float16", "highest"),
         "fp32-ieee": ("float32", "highest"), "fp32-tf32": ("float32", "high")}
# Which leaves need gradients: the whole backward, inference, and experts frozen (no weight gradients).
CASES = {"train": ("x", "weight", "w_in", "w_out", "b_in", "b_out"), "inference": (), "frozen": ("x", "weight")}
SHAPES = ("mixtral", "fine_grained", "vmoe_b")


# --- recording (in the worker, with TRITON_INTERPRET=0) -----------------------------------------
def _benchmark_shapes():
    spec = importlib.util.spec_from_file_location("moezoo_benchmark_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.SHAPES


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def recorded_launches(shape, dtype, precision: str, needs_grad: tuple[str, ...]) -> list[tuple]:
    """(kernel, args, kwargs) of every kernel launch of one forward (and backward) on meta tensors."""
    import torch

    from moezoo.kernels import triton_backend as tb

    meta = {"device": "meta"}
    width = 2 * shape.hidden if shape.gated else shape.hidden
    assignments = shape.tokens * shape.k
    leaves = {
        "x": torch.empty(shape.tokens, shape.dim, dtype=dtype, **meta),
        "weight": torch.empty(assignments, dtype=torch.float32, **meta),  # the router's fp32 probabilities
        "w_in": torch.empty(shape.experts, shape.dim, width, dtype=dtype, **meta),
        "w_out": torch.empty(shape.experts, shape.hidden, shape.dim, dtype=dtype, **meta),
        "b_in": torch.empty(shape.experts, width, dtype=dtype, **meta) if shape.bias else None,
        "b_out": torch.empty(shape.experts, shape.dim, dtype=dtype, **meta) if shape.bias else None,
    }
    for name in needs_grad:
        if leaves[name] is not None:
            leaves[name].requires_grad_()
    token = torch.empty(assignments, dtype=torch.int64, **meta)
    expert = torch.empty(assignments, dtype=torch.int64, **meta)

    launches: list[tuple] = []
    kernels = {name: value for name, value in vars(tb).items() if name.endswith("_kernel")}
    saved_precision = torch.get_float32_matmul_precision()
    try:
        for name, kernel in kernels.items():
            setattr(tb, name, _Recorder(kernel, launches))
        torch.set_float32_matmul_precision(precision)
        out = tb.expert_mlp_triton(leaves["x"], token, expert, leaves["weight"], leaves["w_in"], leaves["w_out"],
                                   shape.activation, b_in=leaves["b_in"], b_out=leaves["b_out"], gated=shape.gated)
        wanted = [t for t in leaves.values() if t is not None and t.requires_grad]
        if wanted:
            torch.autograd.grad(out, wanted, torch.empty_like(out))
    finally:
        for name, kernel in kernels.items():
            setattr(tb, name, kernel)
        torch.set_float32_matmul_precision(saved_precision)
    return launches


# --- specialisation and compilation -------------------------------------------------------------
def _jit_function(kernel):
    """The JITFunction under autotune/heuristics wrappers, and the heuristics met on the way."""
    import triton

    heuristics = {}
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        heuristics.update(getattr(kernel, "values", {}))
        kernel = kernel.fn
    return kernel, heuristics


def specialise(kernel, args: tuple, kwargs: dict, config) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) of this launch with ``config``, as Triton's launcher builds them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn, heuristics = _jit_function(kernel)
    named = {**dict(zip(fn.arg_names, args)), **kwargs, **(config.kwargs if config else {})}
    for name, rule in heuristics.items():
        named[name] = rule(named)
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = named[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constants[param.name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constants, attrs


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.DOTALL)


def compile_config(kernel, args: tuple, kwargs: dict, config, capability: int) -> dict:
    """Compile one launch in one config for ``capability``: shared memory, registers, spills, buffers."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = _jit_function(kernel)
    signature, constants, attrs = specialise(kernel, args, kwargs, config)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    log = io.StringIO()
    start = time.perf_counter()
    # ptxas runs, and prints its -v log, only when the kernel is really compiled, not when it is cached.
    knobs.compilation.always_compile = knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    seconds = time.perf_counter() - start
    match = _PTXAS.search(log.getvalue())
    # Multi-buffered operand tiles are 3-D local_allocs (buffers x rows x cols); the ring depth is the
    # number of tiles the software pipeline keeps in flight.
    rings = [int(n) for n in re.findall(r"ttg\.local_alloc[^\n]*!ttg\.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])]
    return {
        "shared": compiled.metadata.shared,
        "registers": int(match.group(3)),
        "spill_bytes": int(match.group(1)) + int(match.group(2)),
        "buffers": rings,
        "mma_waits": sorted({int(n) for n in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", compiled.asm["ttgir"])}),
        "mma": "wgmma" if "wgmma" in compiled.asm["ptx"] else ("mma" if "mma.sync" in compiled.asm["ptx"] else "fma"),
        "compile_s": round(seconds, 2),
    }


# --- the sweep ----------------------------------------------------------------------------------
def _kernel_name(kernel) -> str:
    return _jit_function(kernel)[0].__name__


def _flags(kernel, args: tuple, kwargs: dict) -> str:
    """The launch's flags and which optional pointers it passes, e.g. ``GATHER ACT=3 GATED z_ptr``."""
    fn, _ = _jit_function(kernel)
    named = dict(zip(fn.arg_names, args))
    words = [name if value is True else f"{name}={value}" for name, value in kwargs.items()
             if value not in (False, None) and name not in ("UPCAST", "PRECISION", "E_POW2")]
    optional = [name for name, value in named.items() if name.endswith("_ptr") and value is None]
    return " ".join(words + [f"no {name}" for name in optional])


def unique_launches(dtype_name: str, precision: str) -> list[tuple]:
    """(kernel, args, kwargs, where) of every launch of the benchmark shapes and cases, the first one
    of each kernel and flag combination: the shapes differ otherwise only in sizes, all multiples of
    16 (which specialise alike), and in E_POW2, the width of the scan over experts."""
    import torch

    shapes = _benchmark_shapes()
    found: dict[tuple, tuple] = {}
    for shape_name in SHAPES:
        for case, needs_grad in CASES.items():
            for kernel, args, kwargs in recorded_launches(shapes[shape_name], getattr(torch, dtype_name), precision,
                                                          needs_grad):
                key = (_kernel_name(kernel), _flags(kernel, args, kwargs))
                if key not in found:
                    found[key] = (kernel, args, kwargs, [])
                found[key][3].append(f"{shape_name}/{case}")
    return list(found.values())


def _default_config():
    """The launch options of a kernel without autotuning (Triton's CUDA defaults)."""
    import triton

    return triton.Config({}, num_warps=4, num_stages=3)


def _pressure(config) -> tuple[int, int]:
    """Accumulator elements per thread, then tile area: the kept config most likely to spill."""
    m, n = sorted((v for name, v in config.kwargs.items() if name != "GROUP_M"), reverse=True)[:2]
    return m * n // config.num_warps, m * n


def sweep(which: str) -> list[dict]:
    """One row per (mode, target, launch, config): the pruning's verdict and, where compiled, the result.

    ``which``: "fast" compiles one kept config per kernel, mode and target, "full" every kept config,
    "candidates" every config meant for the launch's element size, the pruned ones too (what the
    pruning rules were measured from).
    """
    from moezoo.kernels import triton_backend as tb

    rows = []
    for m, (mode, (dtype_name, precision)) in enumerate(MODES.items()):
        by_kernel: dict[str, list[tuple]] = {}
        for launch in unique_launches(dtype_name, precision):
            by_kernel.setdefault(_kernel_name(launch[0]), []).append(launch)
        for t, (target_name, (capability, shared_memory)) in enumerate(TARGETS.items()):
            target = tb._Target(capability, shared_memory)
            for name, launches in by_kernel.items():
                turn = (m * len(TARGETS) + t) % len(launches)  # the launch the fast sweep compiles here
                for i, (kernel, args, kwargs, where) in enumerate(launches):
                    fn, _ = _jit_function(kernel)
                    named = {**dict(zip(fn.arg_names, args)), **kwargs}
                    rules = getattr(kernel, "early_config_prune", None)
                    configs = kernel.configs if rules else [_default_config()]
                    verdicts = [rules.rejection(c, named, target) if rules else None for c in configs]
                    kept = [c for c, why in zip(configs, verdicts) if why is None]
                    chosen = max(kept, key=_pressure) if kept and rules else (kept[0] if kept else None)
                    for config, why in zip(configs, verdicts):
                        row = {"mode": mode, "target": target_name, "kernel": name, "launch": i,
                               "flags": _flags(kernel, args, kwargs), "where": where,
                               "config": {**config.kwargs, "num_warps": config.num_warps,
                                          "num_stages": config.num_stages},
                               "kept": why is None, "rejection": why, "shared_limit": shared_memory,
                               "shared_estimate": rules.shared_memory(config, named) if rules else None}
                        if (which == "full" and why is None
                                or which == "candidates" and (not rules or rules.suits_dtype(config, named))
                                or i == turn and config is chosen):
                            try:
                                row.update(compile_config(kernel, args, kwargs, config, capability))
                            except Exception as error:  # recorded: a kept config that fails fails the test
                                row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
                        rows.append(row)
                        print(_table_line(row), file=sys.stderr, flush=True)
    return rows


def _config_text(config: dict) -> str:
    tiles = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK"))
    return f"{tiles or '-'} w{config['num_warps']} s{config['num_stages']}"


def _table_line(row: dict) -> str:
    if "registers" in row:
        result = (f"smem {row['shared']:>6} regs {row['registers']:>3} spill {row['spill_bytes']:>5} "
                  f"buffers {row['buffers']} waits {row['mma_waits']} {row['mma']} {row['compile_s']}s")
    else:
        result = row.get("error", "not compiled")
    verdict = "kept" if row["kept"] else f"pruned ({row['rejection']})"
    return (f"{row['mode']:9} {row['target']} {row['kernel']:22} #{row['launch']} {_config_text(row['config']):20} "
            f"{verdict:12.60} {result}  [{row['flags']}]")


# --- the tests ----------------------------------------------------------------------------------
def _run_sweep(which: str, tmp_path: Path, timeout: int) -> dict:
    """The sweep's report, run in a fresh process with the interpreter off (its table on stderr,
    printed here: visible with ``pytest -s``) and a cold Triton cache."""
    out = tmp_path / "compile.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    command = [sys.executable, str(Path(__file__).resolve()), "--sweep", which, "--json", str(out)]
    result = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(result.stderr)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


def _check_report(report: dict) -> None:
    from moezoo.kernels import triton_backend as tb

    rows = report["rows"]
    compiled = [row for row in rows if "registers" in row or "error" in row]
    kept = [row for row in compiled if row["kept"]]
    assert not [row for row in kept if "error" in row], "kept configs that do not compile"
    assert not [row for row in kept if row["shared"] > row["shared_limit"]], "kept configs over the shared memory"
    assert not [row for row in kept if row["spill_bytes"]], "kept configs that spill registers"
    # The pruning's estimate bounds what the compiler allocates (so no launch can fail on it).
    assert not [row for row in compiled if row["shared_estimate"] and row["shared"] > row["shared_estimate"]]
    launches = {}
    for row in rows:
        key = (row["mode"], row["target"], row["kernel"], row["launch"])
        launches[key] = launches.get(key, False) or row["kept"]
    assert all(launches.values()), [key for key, any_kept in launches.items() if not any_kept]
    kernels = {name for name in vars(tb) if name.endswith("_kernel")}
    for mode in MODES:
        for target in TARGETS:
            assert {row["kernel"] for row in kept if (row["mode"], row["target"]) == (mode, target)} == kernels
    # The weight-gradient loop keeps num_stages row blocks in flight on sm_90 (its tokens are loaded
    # a block ahead; num_stages - 1 on sm_80, whose pipeliner keeps one stage fewer), and on sm_90
    # its wgmma stays asynchronous (a wait that leaves one group pending) wherever tensor cores run.
    for row in kept:
        if row["kernel"] == "_grouped_wgrad_kernel":
            stages = row["config"]["num_stages"]
            assert min(row["buffers"][-2:]) == (stages if row["mma"] == "wgmma" else stages - 1), row
            if row["mma"] == "wgmma":
                assert max(row["mma_waits"]) >= 1, row


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """One kept config per kernel, mode and target, every flag combination of each kernel among
    them: compiles, fits the target's shared memory, does not spill."""
    _check_report(_run_sweep("fast", tmp_path, timeout=900))


@pytest.mark.slow
def test_every_kept_config_compiles_for_sm80_and_sm90(tmp_path):
    """Every config the pruning keeps, for every launch, mode and target."""
    _check_report(_run_sweep("full", tmp_path, timeout=14400))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=["fast", "full", "candidates"], default="fast")
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        parser.error("compiling needs TRITON_INTERPRET=0 (the kernels are decorated for the interpreter otherwise)")
    start = time.perf_counter()
    rows = sweep(args.sweep)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"sweep": args.sweep, "seconds": round(time.perf_counter() - start, 1)})[:-1]
    body = ",\n".join(json.dumps(row) for row in rows)  # one row per line: diffable, greppable
    args.json.write_text(f'{header}, "rows": [\n{body}\n]}}\n')


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
