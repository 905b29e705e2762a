"""The Triton expert computation: grouped GEMMs with fused gather and weighted scatter, fwd and bwd.

Design (in the style of ScatterMoE, arXiv 2403.08245):

* Assignments are sorted by expert on the device (:func:`sort_by_expert`), with no host sync. The
  GEMM grids are sized from ``A`` (known on the host): ``cdiv(A, BLOCK_M) + min(E, A)`` row blocks
  bound the per-expert blocks ``sum_e cdiv(count_e, BLOCK_M)`` for any split of A rows, and each
  program finds its expert from the per-expert offsets (a cumsum over E in registers). Blocks past
  the last expert do no work. No padding of experts: ragged blocks are masked.
* Forward, kernel 1 (gather): ``z = x[token] @ w_in[e] + b_in[e]`` reads the rows of ``x``
  directly through ``token``, and the epilogue applies the activation (and ``act(g) * u`` when
  gated), writing ``h`` (A, H) in sorted order; ``z`` is also written when a backward will follow.
* Forward, kernel 2 (weighted): ``y = (h @ w_out[e] + b_out[e]) * weight``, written (A, Dout) in
  sorted order, then a per-token reduction kernel sums each token's rows in fp32. This is
  deterministic (unlike fp32 atomics into ``out``), costs one extra read of ``y`` (A * Dout
  elements, against the GEMM's A * H * Dout multiply-adds), and keeps autotuning safe: no kernel
  accumulates into its output, so benchmarking a config twice changes nothing.
* Backward (one autograd.Function): kernel 3 computes ``g = dout[token] @ w_out[e]^T`` (gather)
  and, in its epilogue, recomputes ``h`` from the saved ``z``, the activation derivative, ``dz``,
  ``weight * h`` and the per-row partial ``<g, h>`` of ``d weight`` (``d weight[a] = <dout[t], y_a>
  = <g_a, h_a> + <dout[t], b_out[e]>``, so ``y`` is never stored). ``dw_out = sum (weight * h)^T
  dout[token]`` and ``dw_in = sum x[token]^T dz`` are per-expert reductions over the sorted rows,
  whose loop loads each block's tokens one block ahead so the gathered operand pipelines like the
  other; ``db_in`` is summed by the ``dw_in`` kernel (column sums of ``dz`` in the programs of its
  first row tile), ``db_out`` is a per-expert column sum of ``weight * dout[token]``, and ``dx`` is
  kernel 2 with ``w_in^T`` followed by the token reduction.
* Memory: between forward and backward only ``z`` (A, W) is kept (plus the inputs); ``h`` is
  recomputed in kernel 3's epilogue (elementwise, nearly free) instead of being saved, which
  halves the saved activations for plain experts (a third for gated ones: z is 2H wide, h is H).
  Transients: forward ``h`` (A, H) and ``y`` (A, Dout); backward ``weight * h`` (A, H), ``dz``
  (A, W), the ``d weight`` partials (ceil(H / min BLOCK_N), A) fp32 and ``dx`` rows (A, D).
* Launch configs: each autotuned kernel has candidate tiles for Hopper and Ampere, and
  :class:`_ConfigRules` prunes them per launch, before any is compiled, to those that fit the
  device's shared memory and do not spill registers (rules measured by compiling every config
  ahead of time for sm_80 and sm_90, see ``tests/kernels/test_triton_compile.py``).

All GEMMs accumulate in fp32. fp32 inputs follow ``torch.get_float32_matmul_precision()`` as
torch's own CUDA matmuls do: "highest" is an exact fp32 dot, "high" and "medium" one TF32 pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from moezoo.kernels.activations import get_activation
from moezoo.kernels.sorting import sort_by_expert

__all__ = ["INTERPRET", "expert_mlp_triton"]

# triton.jit picks the interpreter when the kernels below are decorated, i.e. at import time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Activation codes, shared by the Python wrappers and the kernels (0: no activation).
_ACT_CODES = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# torch's "high" and "medium" both let cuBLAS run fp32 matmuls on TF32 tensor cores (one pass, 10
# mantissa bits); 3xTF32 would be about fp32-exact at three times the MMA work, i.e. more than
# torch itself gives for the same setting.
_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}

# --- launch configurations ----------------------------------------------------------------------
# The interpreter runs every program in numpy, so autotuning there would take minutes: it gets one
# small config (16 is tl.dot's minimum) that still splits the test shapes into several tiles.
# On the GPU, candidates for Hopper and Ampere (wgmma wants BLOCK_M a multiple of 64), pruned per
# launch by _ConfigRules: what does not fit the device's shared memory or spills is never tried.
if INTERPRET:
    _GEMM_TILES = _EPILOGUE_TILES = _WGRAD_TILES = [(16, 16, 16, 1, 1)]
    _ROW_BLOCK, _COL_BLOCK, _TOKEN_BLOCK = 16, 32, 32  # reduction kernels: rows per step, columns per program
else:
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_K 64/128 serve 16-bit inputs, 32/64
    # fp32 (the K tile is kept at 128 or 256 bytes of each row, see _ConfigRules); the 64x64 tiles
    # fit the 99 KiB of consumer GPUs, gated and in fp32, and 64x64x32 on 8 warps is the gated
    # GEMM's spill-free tile for FMA dots.
    _GEMM_TILES = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
        (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (64, 64, 64, 4, 3),
        (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3),
        (64, 64, 32, 8, 3),
    ]
    # The backward kernel 3 keeps ~5 fp32 tiles live in its epilogue: at most 32 accumulators per
    # thread, 16 with TF32 (see _ACCUMULATORS).
    _EPILOGUE_TILES = [
        (128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4),
        (128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 8, 3),
    ]
    # (BLOCK_P, BLOCK_Q, BLOCK_K = rows per step, num_warps, num_stages); every stage is a real
    # buffer here (see _wgrad_loop), so stages cost shared memory linearly.
    _WGRAD_TILES = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (128, 64, 64, 4, 5),
        (64, 128, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 16, 4, 4),
    ]
    # Memory-bound reductions: bias column sums keep a (rows, columns) fp32 tile; the per-token sum
    # keeps one row, so it takes wider column blocks (16-byte loads over 128 threads).
    _ROW_BLOCK, _COL_BLOCK, _TOKEN_BLOCK = 32, 256, 1024
_MIN_BLOCK_N = min(tile[1] for tile in _EPILOGUE_TILES)  # sizes kernel 3's partial sums


def _configs(tiles: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    return [
        triton.Config({names[0]: m, names[1]: n, names[2]: k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


@dataclass(frozen=True)
class _Target:
    """What a GPU offers a launch: compute capability (10 * major + minor) and the shared memory
    one block may use (bytes, the opt-in maximum that Triton's launcher checks)."""

    capability: int
    shared_memory: int


@functools.cache
def _device_target(index: int) -> _Target:
    major, minor = torch.cuda.get_device_capability(index)
    return _Target(10 * major + minor, triton.compiler.max_shared_mem(index))


# Register budgets that compile without spills, measured by compiling every candidate config for
# sm_80 and sm_90 ahead of time (tests/kernels/test_triton_compile.py: Triton 3.8, ptxas 12.9, the
# benchmark shapes, bf16/fp16/fp32 in both precisions; the measurements are in
# benchmarks/results/triton_compile_candidates.json). What decides a spill is the number of fp32
# accumulator values each thread holds, BLOCK_M * BLOCK_N (* 2 when gated) / (32 * num_warps),
# against what the rest of the launch keeps live. The most per thread that no measured launch
# spilled at, by launch role, for tensor-core dots: (sm_80 16-bit, sm_80 TF32, sm_90 16-bit,
# sm_90 TF32); sm_90's values serve later GPUs too. TF32 on sm_80's mma.sync holds 32-bit operand
# fragments, twice those of 16-bit types.
_ACCUMULATORS = {
    "plain": (64, 64, 128, 64),  # GEMM, no activation (forward GEMM 2, dx): sm_80 128x128 w4 spills 24-40 B
    "activation": (64, 64, 64, 64),  # GEMM 1 with GELU, bias, z: 128 spills 344-1252 B
    "gated": (64, 128, 64, 128),  # GEMM 1, two accumulators: 16-bit at 128 spills 8-3672 B, TF32 does not
    "epilogue": (32, 16, 32, 16),  # kernel 3 (about five fp32 tiles live): 64 spills 24-3512 B, TF32 gated at 32 8-128 B
    "wgrad": (128, 32, 128, 128),  # weight gradients: TF32 on sm_80 at 128 spills 32-48 B
    "wgrad_db": (64, 32, 128, 128),  # with the bias column sums: 128 spills 72-526 B on sm_80
}
_FMA_ACCUMULATORS = 32


@dataclass(frozen=True)
class _ConfigRules:
    """Which autotune configs of one kernel can run a launch well on a target.

    The autotuner compiles and times every config it is given, and one that cannot launch (shared
    memory over the limit) only scores inf: when all of them fail it keeps the first and the real
    launch raises OutOfResources. A config that spills registers launches but runs slowly. Both are
    pruned before tuning instead (``early_config_prune``), and so are the tiles meant for another
    element size.

    Attributes:
        operand: the pointer argument whose element size sizes the operand tiles.
        m, n, k: the names of the tile sizes (rows, columns, reduction).
        role: the launch's arguments -> its key in :data:`_ACCUMULATORS`.
        two_b_tiles: the flag with which the kernel keeps two B tiles (and accumulators) per stage.
        k_contiguous: the A tile is read along K, so K tiles narrower than 128 bytes of a row waste
            the 128-byte swizzled loads and wider than 256 bytes only add shared memory.
        fma_tiles: the (m, n, k, num_warps) kept for FMA dots.
    """

    operand: str
    m: str
    n: str
    k: str
    role: Callable[[dict], str]
    fma_tiles: frozenset[tuple[int, int, int, int]]
    two_b_tiles: str | None = None
    k_contiguous: bool = True

    def _b_tiles(self, args: dict) -> int:
        return 2 if self.two_b_tiles is not None and args[self.two_b_tiles] else 1

    def shared_memory(self, config: triton.Config, args: dict) -> int:
        """Bytes of the pipelined operand tiles: num_stages copies of the A and B tiles (sm_90
        keeps num_stages buffers; sm_80 one fewer, which leaves room for reduction scratch)."""
        m, n, k = (config.kwargs[name] for name in (self.m, self.n, self.k))
        return (m * k + self._b_tiles(args) * k * n) * config.num_stages * args[self.operand].element_size()

    def accumulators(self, config: triton.Config, args: dict) -> int:
        """fp32 accumulator values per thread."""
        m, n = config.kwargs[self.m], config.kwargs[self.n]
        return m * n * self._b_tiles(args) // (32 * config.num_warps)

    def suits_dtype(self, config: triton.Config, args: dict) -> bool:
        """Whether the config is meant for the launch's element size and dot at all."""
        if args["PRECISION"] == "ieee":
            tile = tuple(config.kwargs[name] for name in (self.m, self.n, self.k)) + (config.num_warps,)
            return tile in self.fma_tiles
        return not self.k_contiguous or 128 <= config.kwargs[self.k] * args[self.operand].element_size() <= 256

    def rejection(self, config: triton.Config, args: dict, target: _Target) -> str | None:
        """Why ``config`` must not run this launch (``args``: the kernel's arguments by name) on
        ``target``, or None when it may."""
        if not self.suits_dtype(config, args):
            return "a tile meant for another element size or dot"
        smem = self.shared_memory(config, args)
        if smem > target.shared_memory:
            return f"needs {smem} bytes of shared memory, the target has {target.shared_memory}"
        role = self.role(args)
        if args["PRECISION"] == "ieee":
            limit = _FMA_ACCUMULATORS
        else:
            tf32 = args[self.operand].element_size() == 4
            limit = _ACCUMULATORS[role][2 * (target.capability >= 90) + tf32]
        if self.accumulators(config, args) > limit:
            return f"{self.accumulators(config, args)} accumulators per thread spill ({role}: at most {limit})"
        return None

    def __call__(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        target = _device_target(args[self.operand].device.index)
        kept = [config for config in configs if self.rejection(config, args, target) is None]
        if not kept:
            reasons = {str(config): self.rejection(config, args, target) for config in configs}
            raise RuntimeError(f"no launch config fits this GPU ({target}): {reasons}")
        return kept


_GEMM_CONFIGS = _configs(_GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
_EPILOGUE_CONFIGS = _configs(_EPILOGUE_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
_WGRAD_CONFIGS = _configs(_WGRAD_TILES, ("BLOCK_P", "BLOCK_Q", "BLOCK_K"))
_GEMM_RULES = _ConfigRules("a_ptr", "BLOCK_M", "BLOCK_N", "BLOCK_K", two_b_tiles="GATED",
                           role=lambda args: "gated" if args["GATED"] else "activation" if args["ACT"] else "plain",
                           fma_tiles=frozenset({(128, 64, 32, 8), (64, 64, 32, 8)}))
_EPILOGUE_RULES = _ConfigRules("dout_ptr", "BLOCK_M", "BLOCK_N", "BLOCK_K", role=lambda args: "epilogue",
                               fma_tiles=frozenset({(128, 64, 32, 8)}))
_WGRAD_RULES = _ConfigRules("l_ptr", "BLOCK_P", "BLOCK_Q", "BLOCK_K", k_contiguous=False,
                            role=lambda args: "wgrad" if args["db_ptr"] is None else "wgrad_db",
                            fma_tiles=frozenset({(64, 64, 16, 4)}))
_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})


# --- kernel building blocks ---------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. UPCAST only in the interpreter, whose numpy dot cannot read bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _erf_gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _tanh(u):
    # tanh through exp (the interpreter and every backend have it); exp(-2|u|) <= 1 cannot overflow.
    decay = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - decay) / (1.0 + decay)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) for the activation codes of ``_ACT_CODES`` (fp32 in and out)."""
    if ACT == 1:
        return _erf_gelu(z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 3:
        return z * tl.sigmoid(z)
    elif ACT == 4:
        return tl.maximum(z, 0.0)
    else:
        return z


@triton.jit
def _activation_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)); relu'(0) = 0 as in torch."""
    if ACT == 1:
        normal_pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return _erf_gelu(z), 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * normal_pdf
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        slope = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * slope
    elif ACT == 3:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        return tl.maximum(z, 0.0), (z > 0.0).to(tl.float32)
    else:
        return z, tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column tile), GROUP_M row blocks at a time: programs running
    together share weight tiles (same expert) and row tiles, so both stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _expert_rows(pid_m, offsets_ptr, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert e and sorted rows [lo, hi) of row block pid_m (experts split into BLOCK_M blocks, in order).

    Past the last block, lo >= hi (no rows) and e is clamped to a valid expert for addressing.
    """
    experts = tl.arange(0, E_POW2)
    start = tl.load(offsets_ptr + experts, mask=experts < E, other=0)
    end = tl.load(offsets_ptr + experts + 1, mask=experts < E, other=0)
    blocks = (end - start + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.cumsum(blocks, 0)
    e = tl.sum((blocks_end <= pid_m).to(tl.int32))
    mine = experts == e
    lo = tl.sum(tl.where(mine, start + (pid_m - (blocks_end - blocks)) * BLOCK_M, 0))
    hi = tl.sum(tl.where(mine, end, 0))
    return tl.minimum(e, E - 1), lo, hi


@triton.jit
def _row_tile(pid, offsets_ptr, tok_ptr, A, E, N,
              GATHER: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):
    """The output tile of a row-grouped GEMM program.

    Returns e, the sorted rows (BLOCK_M,) and their mask, the source row of each (its token with
    GATHER, else itself; masked rows read row 0, which exists and is never stored), the columns
    (BLOCK_N,) and their mask, and the number of K steps (0 for blocks without rows).
    """
    num_m = tl.cdiv(A, BLOCK_M) + tl.minimum(A, E)  # must match _gemm_grid
    pid_m, pid_n = _swizzle(pid, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, lo, hi = _expert_rows(pid_m, offsets_ptr, E, E_POW2, BLOCK_M)
    rows = lo + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    if GATHER:
        src = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    else:
        src = tl.where(row_ok, rows, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e.to(tl.int64), rows, row_ok, src.to(tl.int64), pid_n, cols, cols < N, hi > lo


@triton.jit
def _mm_tile(a_ptrs, w_ptrs, w2_offset, col_ok, K, has_rows, stride_ak, stride_wk,
             TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(a rows @ W tile, a rows @ (W tile + w2_offset)) over K, fp32; the second only with TWO.

    a_ptrs: (BLOCK_M, BLOCK_K) pointers at k = 0; w_ptrs: (BLOCK_K, BLOCK_N) pointers at k = 0.
    Loading the rows once for both products is what makes the gated (GLU) forward one pass.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for i in range(tl.where(has_rows, tl.cdiv(K, BLOCK_K), 0)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w_mask = col_ok[None, :]
        else:
            k_ok = offs_k < K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
        acc = _dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, UPCAST, PRECISION)
        if TWO:
            acc2 = _dot(a, tl.load(w_ptrs + w2_offset, mask=w_mask, other=0.0), acc2, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc2


# --- kernels ------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, prune_configs_by={"early_config_prune": _GEMM_RULES},
                 key=["N", "K", "ROWS_BUCKET", "GATHER", "ACT", "GATED", "HAS_BIAS", "HAS_SCALE", "STORE_Z", "PRECISION"])
@_EVEN_K
@triton.jit
def _grouped_mm_kernel(
    a_ptr, stride_am, stride_ak,             # (rows, K): x (gathered by token) or sorted rows
    tok_ptr, offsets_ptr,                    # (A,) token per sorted row; (E + 1,) expert offsets
    w_ptr, stride_we, stride_wk, stride_wn,  # (E, K, N), or (E, K, 2N) [gate | up] when GATED
    b_ptr, stride_be, stride_bn,             # (E, N or 2N) bias, or None
    scale_ptr,                               # (A,) per-row output scale, or None
    z_ptr, stride_zm, stride_zn,             # (A, N or 2N) pre-activation output, or None
    out_ptr, stride_om, stride_on,           # (A, N) output, sorted order
    A, E, N, K, ROWS_BUCKET,
    GATHER: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[m] = scale[m] * act(a[src(m)] @ w[e(m)] + b[e(m)]), gated: act(gate) * up."""
    e, rows, row_ok, src, _, cols, col_ok, has_rows = _row_tile(
        tl.program_id(0), offsets_ptr, tok_ptr, A, E, N, GATHER, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc, up = _mm_tile(a_ptrs, w_ptrs, N * stride_wn, col_ok, K, has_rows, stride_ak, stride_wk,
                       GATED, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
    if HAS_BIAS:
        b_ptrs = b_ptr + e * stride_be + cols * stride_bn
        acc += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_ptrs + N * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_zm + cols[None, :] * stride_zn
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=tile_ok)
        if GATED:
            tl.store(z_ptrs + N * stride_zn, up.to(z_ptr.dtype.element_ty), mask=tile_ok)
    acc = _activation(acc, ACT)
    if GATED:
        acc = acc * up
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


# part_ptr is zeroed before every config tried and before the real launch: a config with a smaller
# BLOCK_N fills more rows of it than the chosen one overwrites, and the rows are summed afterwards.
@triton.autotune(configs=_EPILOGUE_CONFIGS, prune_configs_by={"early_config_prune": _EPILOGUE_RULES},
                 key=["N", "K", "ROWS_BUCKET", "ACT", "GATED", "STORE_WH", "PRECISION"], reset_to_zero=["part_ptr"])
@_EVEN_K
@triton.jit
def _mlp_in_grad_kernel(
    dout_ptr, stride_dt, stride_dk,          # (T, Dout) upstream gradient, gathered by token
    tok_ptr, offsets_ptr,
    w_ptr, stride_we, stride_wk, stride_wn,  # w_out seen as (E, K=Dout, N=H) through its strides
    weight_ptr,                              # (A,) sorted combine weights
    z_ptr, stride_zm, stride_zn,             # (A, H or 2H) saved pre-activation
    wh_ptr, stride_hm, stride_hn,            # (A, H) weight * recomputed hidden output, or None
    dz_ptr, stride_dzm, stride_dzn,          # (A, H or 2H) gradient of z
    part_ptr, stride_pn,                     # (tiles, A) fp32: sum over this column tile of g * h
    A, E, N, K, ROWS_BUCKET,
    ACT: tl.constexpr, GATED: tl.constexpr, STORE_WH: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """g = dout[token] @ w_out[e]^T; dh = weight * g; dz = dh * d h / d z; wh = weight * h; part = rowsum(g * h).

    ``wh`` is the left operand of ``dw_out``, scaled here so the weight-gradient loop reads both of
    its operands straight into the pipelined shared-memory ring (a per-row scale there needs a
    register round trip and a synchronous MMA on every step).
    """
    e, rows, row_ok, src, pid_n, cols, col_ok, has_rows = _row_tile(
        tl.program_id(0), offsets_ptr, tok_ptr, A, E, N, True, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dout_ptr + src[:, None] * stride_dt + offs_k[None, :] * stride_dk
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    g, _ = _mm_tile(a_ptrs, w_ptrs, 0, col_ok, K, has_rows, stride_dk, stride_wk,
                    False, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z_ptrs = z_ptr + rows64 * stride_zm + cols[None, :] * stride_zn
    gate, d_gate = _activation_and_grad(tl.load(z_ptrs, mask=tile_ok, other=0.0).to(tl.float32), ACT)
    row_weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dh = g * row_weight
    dz_ptrs = dz_ptr + rows64 * stride_dzm + cols[None, :] * stride_dzn
    if GATED:
        up = tl.load(z_ptrs + N * stride_zn, mask=tile_ok, other=0.0).to(tl.float32)
        h = gate * up
        tl.store(dz_ptrs, (dh * up * d_gate).to(dz_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dz_ptrs + N * stride_dzn, (dh * gate).to(dz_ptr.dtype.element_ty), mask=tile_ok)
    else:
        h = gate
        tl.store(dz_ptrs, (dh * d_gate).to(dz_ptr.dtype.element_ty), mask=tile_ok)
    if STORE_WH:
        wh_ptrs = wh_ptr + rows64 * stride_hm + cols[None, :] * stride_hn
        tl.store(wh_ptrs, (h * row_weight).to(wh_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(part_ptr + pid_n * stride_pn + rows, tl.sum(g * h, axis=1), mask=row_ok)


@triton.jit
def _wgrad_loop(l_ptr, stride_lm, stride_lp, r_ptr, stride_rm, stride_rq, tok_ptr, lo, hi, ps, p_ok, qs, q_ok,
                GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, SUM_R: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """(sum over rows [lo, hi) of l[src]^T r[src] (BLOCK_P, BLOCK_Q), column sums of r (BLOCK_Q,)) in fp32.

    The column sums are computed only with SUM_R (zeros otherwise).
    """
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    colsum = tl.zeros((BLOCK_Q,), tl.float32)
    offs = tl.arange(0, BLOCK_K)
    # The tokens of each row block are loaded one block ahead: loaded in the block that uses them,
    # they would make the gathered operand an indirect load, for which the software pipeliner
    # spends one of num_stages on the index and another on its latency (2 operand buffers of 4,
    # read from the TTGIR) instead of keeping num_stages row blocks in flight.
    tok = tl.load(tok_ptr + lo + offs, mask=lo + offs < hi, other=0).to(tl.int64)
    for start in range(lo, hi, BLOCK_K):
        rows = start + offs
        row_ok = rows < hi
        tok_next = tl.load(tok_ptr + rows + BLOCK_K, mask=rows + BLOCK_K < hi, other=0).to(tl.int64)
        rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
        l_rows = tok if GATHER_L else rows64
        r_rows = tok if GATHER_R else rows64
        # Both operands are masked by row: another expert's rows may hold inf/nan, and 0 * inf != 0.
        lt = tl.load(l_ptr + l_rows[None, :] * stride_lm + ps[:, None] * stride_lp,
                     mask=row_ok[None, :] & p_ok[:, None], other=0.0)
        r = tl.load(r_ptr + r_rows[:, None] * stride_rm + qs[None, :] * stride_rq,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        acc = _dot(lt, r, acc, UPCAST, PRECISION)
        if SUM_R:
            colsum += tl.sum(r.to(tl.float32), axis=0)
        tok = tok_next
    return acc, colsum


@triton.autotune(configs=_WGRAD_CONFIGS, prune_configs_by={"early_config_prune": _WGRAD_RULES},
                 key=["P", "Q", "ROWS_BUCKET", "GATHER_L", "GATHER_R", "PRECISION"])
@triton.jit
def _grouped_wgrad_kernel(
    l_ptr, stride_lm, stride_lp,             # left rows (T or A, P)
    r_ptr, stride_rm, stride_rq,             # right rows (T or A, Q)
    tok_ptr, offsets_ptr,                    # (A,), (E + 1,)
    dw_ptr, stride_de, stride_dp, stride_dq,  # (E, P, Q) output
    db_ptr, stride_be, stride_bq,            # (E, Q) column sums of the right rows, or None
    P, Q, ROWS_BUCKET,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dw[e] = sum over the sorted rows m of expert e of l[src(m)]^T r[src(m)]; db[e] = sum of r[src(m)].

    One program per (P, Q) tile and expert (grid axis 1, so an expert's tiles run together and
    share its rows in L2); experts without rows store zeros. The programs of the first P tile also
    sum the right rows' columns when ``db_ptr`` is given, in a second copy of the loop, so the
    other programs' loop stays as pipelined as without it.
    """
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p, pid_q = _swizzle(tl.program_id(0), tl.cdiv(P, BLOCK_P), num_q, GROUP_M)
    e = tl.program_id(1)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    args = (l_ptr, stride_lm, stride_lp, r_ptr, stride_rm, stride_rq, tok_ptr, lo, hi, ps, p_ok, qs, q_ok)
    if db_ptr is not None and pid_p == 0:
        acc, colsum = _wgrad_loop(*args, GATHER_L, GATHER_R, True, UPCAST, PRECISION,
                                  BLOCK_P, BLOCK_Q, BLOCK_K)
        tl.store(db_ptr + e.to(tl.int64) * stride_be + qs * stride_bq, colsum.to(db_ptr.dtype.element_ty), mask=q_ok)
    else:
        acc, _ = _wgrad_loop(*args, GATHER_L, GATHER_R, False, UPCAST, PRECISION,
                             BLOCK_P, BLOCK_Q, BLOCK_K)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_de + ps[:, None] * stride_dp + qs[None, :] * stride_dq
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _segment_colsum_kernel(
    r_ptr, stride_rm, stride_rq, tok_ptr, offsets_ptr, scale_ptr,
    db_ptr, stride_de, stride_dq, Q,
    GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """db[e] = sum over the sorted rows m of expert e of scale[m] * r[src(m)] (bias gradients)."""
    e = tl.program_id(1)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        if GATHER:
            src = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        r = tl.load(r_ptr + src[:, None] * stride_rm + qs[None, :] * stride_rq,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            r = r * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc += r
    tl.store(db_ptr + e.to(tl.int64) * stride_de + qs * stride_dq,
             tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _sum_by_token_kernel(
    y_ptr, stride_ym, stride_yn,             # (A, N) rows in sorted order
    by_token_ptr, token_offsets_ptr,         # (A,) sorted rows grouped by token; (T + 1,) offsets
    out_ptr, stride_ot, stride_on, N,        # (T, N)
    BLOCK_N: tl.constexpr,
):
    """out[t] = sum of y over token t's rows, in fp32 and in assignment order (deterministic)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for j in range(tl.load(token_offsets_ptr + t), tl.load(token_offsets_ptr + t + 1)):
        row = tl.load(by_token_ptr + j)
        acc += tl.load(y_ptr + row * stride_ym + cols * stride_yn, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# --- host side ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Device-side bookkeeping of one routing, built without host sync.

    Attributes:
        order: (A,) assignment index of each sorted row (sorted by expert, stable).
        token: (A,) token of each sorted row.
        expert: (A,) expert of each sorted row.
        offsets: (E + 1,) first sorted row of each expert; offsets[E] = A.
        by_token: (A,) sorted rows grouped by token, in assignment order within a token.
        token_offsets: (T + 1,) first entry of each token in ``by_token``.
    """

    order: Tensor
    token: Tensor
    expert: Tensor
    offsets: Tensor
    by_token: Tensor
    token_offsets: Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.token_offsets.numel() - 1


def _make_plan(token: Tensor, expert: Tensor, num_tokens: int, num_experts: int) -> _Plan:
    order, _, offsets = sort_by_expert(expert, num_experts)
    tok = token[order]
    by_token = torch.argsort(tok, stable=True)
    bounds = torch.arange(num_tokens + 1, device=token.device, dtype=tok.dtype)
    return _Plan(order, tok, expert[order], offsets, by_token, torch.searchsorted(tok[by_token], bounds))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's matmul setting; 16-bit types ignore it."""
    return _PRECISION[torch.get_float32_matmul_precision()] if dtype == torch.float32 else "tf32"


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16, "PRECISION": _precision(dtype)}


def _rows_bucket(plan: _Plan) -> int:
    """Autotune key only (ROWS_BUCKET is unused in the kernels): log2 of the mean rows per expert.

    The best tile depends on it (decode-sized batches want small BLOCK_M), but keying on A itself
    would re-tune for every capacity-dropped batch size.
    """
    return (plan.token.numel() // plan.num_experts).bit_length()


def _gemm_grid(num_rows: int, plan: _Plan, n: int):
    """Row blocks bound sum_e cdiv(count_e, BLOCK_M) for any split of the rows (see _row_tile)."""
    experts = min(plan.num_experts, num_rows)
    return lambda meta: ((triton.cdiv(num_rows, meta["BLOCK_M"]) + experts) * triton.cdiv(n, meta["BLOCK_N"]),)


def _grouped_mm(a: Tensor, plan: _Plan, w: Tensor, *, gather: bool, n: int, bias: Tensor | None = None,
                scale: Tensor | None = None, act: int = 0, gated: bool = False, z: Tensor | None = None) -> Tensor:
    """Sorted rows m -> scale[m] * act(a[src(m)] @ w[e] + bias[e]) (kernel 1 and 2 of the forward).

    Args:
        a: (T, K) gathered through the plan's tokens with ``gather``, else (A, K) sorted rows.
        w: (E, K, n) or, gated, (E, K, 2n) (any strides: a transposed view works).
        n: output width (H when gated).
        z: optional (A, w width) buffer receiving the pre-activation.

    Returns:
        (A, n) in a's dtype, sorted order.
    """
    num_rows = plan.token.numel()
    out = a.new_empty(num_rows, n)
    _grouped_mm_kernel[_gemm_grid(num_rows, plan, n)](
        a, a.stride(0), a.stride(1), plan.token, plan.offsets,
        w, w.stride(0), w.stride(1), w.stride(2),
        bias, *(bias.stride() if bias is not None else (0, 0)),
        scale,
        z, *(z.stride() if z is not None else (0, 0)),
        out, out.stride(0), out.stride(1),
        num_rows, plan.num_experts, n, a.shape[1], _rows_bucket(plan),
        GATHER=gather, ACT=act, GATED=gated, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        STORE_Z=z is not None, E_POW2=triton.next_power_of_2(plan.num_experts), **_dot_options(a.dtype),
    )
    return out


def _sum_by_token(y: Tensor, plan: _Plan) -> Tensor:
    """(A, N) sorted rows -> (T, N) per-token sums; tokens without rows get zeros."""
    out = y.new_empty(plan.num_tokens, y.shape[1])
    grid = (plan.num_tokens, triton.cdiv(y.shape[1], _TOKEN_BLOCK))
    _sum_by_token_kernel[grid](y, y.stride(0), y.stride(1), plan.by_token, plan.token_offsets,
                               out, out.stride(0), out.stride(1), y.shape[1], BLOCK_N=_TOKEN_BLOCK)
    return out


def _mlp_in_grad(dout: Tensor, plan: _Plan, w_out: Tensor, weight: Tensor, z: Tensor, act: int, gated: bool,
                 store_wh: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """Kernel 3: (weight * h (A, H) or None, dz (A, W), sum_n g * h (A,) fp32) from dout (T, Dout)."""
    num_rows, hidden = z.shape[0], w_out.shape[1]
    wh = z.new_empty(num_rows, hidden) if store_wh else None
    dz = torch.empty_like(z)
    # Rows past the tiles of the chosen BLOCK_N stay zero, so the partials sum to the full dot.
    part = z.new_zeros(triton.cdiv(hidden, _MIN_BLOCK_N), num_rows, dtype=torch.float32)
    w_t = w_out.transpose(1, 2)  # (E, Dout, H): the kernel reads w_out[e]^T without a copy
    _mlp_in_grad_kernel[_gemm_grid(num_rows, plan, hidden)](
        dout, dout.stride(0), dout.stride(1), plan.token, plan.offsets,
        w_t, w_t.stride(0), w_t.stride(1), w_t.stride(2), weight,
        z, z.stride(0), z.stride(1),
        wh, *(wh.stride() if wh is not None else (0, 0)),
        dz, dz.stride(0), dz.stride(1),
        part, part.stride(0),
        num_rows, plan.num_experts, hidden, dout.shape[1], _rows_bucket(plan),
        ACT=act, GATED=gated, STORE_WH=store_wh, E_POW2=triton.next_power_of_2(plan.num_experts),
        **_dot_options(z.dtype),
    )
    return wh, dz, part.sum(0)


def _grouped_wgrad(left: Tensor, right: Tensor, plan: _Plan, out_dtype: torch.dtype, *, gather_left: bool = False,
                   gather_right: bool = False, sum_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """Per expert, over its sorted rows: (E, P, Q) sum of left_row^T right_row and, with ``sum_dtype``,
    (E, Q) sum of right_row (the bias gradient when right is the gradient of the layer's output)."""
    p, q = left.shape[1], right.shape[1]
    dw = left.new_empty(plan.num_experts, p, q, dtype=out_dtype)
    db = None if sum_dtype is None else right.new_empty(plan.num_experts, q, dtype=sum_dtype)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), plan.num_experts)

    _grouped_wgrad_kernel[grid](
        left, left.stride(0), left.stride(1), right, right.stride(0), right.stride(1),
        plan.token, plan.offsets, dw, dw.stride(0), dw.stride(1), dw.stride(2),
        db, *(db.stride() if db is not None else (0, 0)), p, q, _rows_bucket(plan),
        GATHER_L=gather_left, GATHER_R=gather_right, **_dot_options(left.dtype),
    )
    return dw, db


def _segment_colsum(rows: Tensor, plan: _Plan, out_dtype: torch.dtype, *, gather: bool = False,
                    scale: Tensor | None = None) -> Tensor:
    """(E, Q): per expert, sum over its sorted rows of scale * rows[src] (bias gradients)."""
    q = rows.shape[1]
    db = rows.new_empty(plan.num_experts, q, dtype=out_dtype)
    _segment_colsum_kernel[(triton.cdiv(q, _COL_BLOCK), plan.num_experts)](
        rows, rows.stride(0), rows.stride(1), plan.token, plan.offsets, scale, db, db.stride(0), db.stride(1), q,
        GATHER=gather, HAS_SCALE=scale is not None, BLOCK_M=_ROW_BLOCK, BLOCK_Q=_COL_BLOCK,
    )
    return db


class _ExpertMLPFunction(torch.autograd.Function):
    """Forward: kernels 1, 2 and the token reduction. Backward: see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, plan: _Plan, act: int, gated: bool) -> Tensor:
        hidden = w_out.shape[1]
        sorted_weight = weight[plan.order]
        needs_backward = any(ctx.needs_input_grad[:6])
        z = x.new_empty(plan.token.numel(), w_in.shape[2]) if needs_backward else None
        h = _grouped_mm(x, plan, w_in, gather=True, n=hidden, bias=b_in, act=act, gated=gated, z=z)
        y = _grouped_mm(h, plan, w_out, gather=False, n=w_out.shape[2], bias=b_out, scale=sorted_weight)
        ctx.save_for_backward(x, weight, w_in, w_out, b_out, z)
        ctx.plan, ctx.act, ctx.gated, ctx.b_in_dtype = plan, act, gated, None if b_in is None else b_in.dtype
        return _sum_by_token(y, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, w_in, w_out, b_out, z = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_x, need_weight, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        sorted_weight = weight[plan.order]
        dx = dweight = dw_in = dw_out = db_in = db_out = None
        if need_b_out:
            db_out = _segment_colsum(dout, plan, b_out.dtype, gather=True, scale=sorted_weight)
        if not (need_x or need_weight or need_w_in or need_w_out or need_b_in):
            return dx, dweight, dw_in, dw_out, db_in, db_out, None, None, None

        wh, dz, dweight_sorted = _mlp_in_grad(dout, plan, w_out, sorted_weight, z, ctx.act, ctx.gated, need_w_out)
        if need_w_out:
            dw_out, _ = _grouped_wgrad(wh, dout, plan, w_out.dtype, gather_right=True)
        del wh  # the largest transient after dz; free it before the dx and dw_in passes
        if need_weight:
            if b_out is not None:  # <dout[t], b_out[e]> through a (T, E) product instead of (A, Dout) gathers
                dweight_sorted += (dout.float() @ b_out.float().t())[plan.token, plan.expert]
            dweight = torch.empty_like(dweight_sorted).index_copy_(0, plan.order, dweight_sorted).to(weight.dtype)
        if need_w_in:
            dw_in, db_in = _grouped_wgrad(x, dz, plan, w_in.dtype, gather_left=True,
                                          sum_dtype=ctx.b_in_dtype if need_b_in else None)
        elif need_b_in:  # biases trained alone: the column sums without the GEMM
            db_in = _segment_colsum(dz, plan, ctx.b_in_dtype)
        if need_x:
            dx_rows = _grouped_mm(dz, plan, w_in.transpose(1, 2), gather=False, n=x.shape[1])
            dx = _sum_by_token(dx_rows, plan)
        return dx, dweight, dw_in, dw_out, db_in, db_out, None, None, None


def expert_mlp_triton(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str = "gelu",
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    gated: bool = False,
) -> Tensor:
    """``out[t] = sum_{a: token[a]=t} weight[a] * mlp_{expert[a]}(x[t])`` with Triton kernels.

    The semantics of :func:`moezoo.kernels.torch_backend.expert_mlp_torch` without expert dropout.
    Call it through :func:`moezoo.kernels.expert_mlp`, whose
    :func:`~moezoo.kernels.resolve_backend` sends here only what the kernels compute exactly
    (CUDA or the interpreter; x and the expert parameters of one of fp32/fp16/bf16; no dropout in
    training).

    Args:
        x: (T, D) fp32/fp16/bf16.
        token, expert: (A,) int64 assignments; expert in [0, E).
        weight: (A,) float combine weights (any float dtype; gradients flow to it).
        w_in: (E, D, W) with W = H, or 2H ([gate | up]) when ``gated``.
        w_out: (E, H, Dout).
        activation: "gelu" (erf), "gelu_tanh", "silu" or "relu".
        b_in: optional (E, W); b_out: optional (E, Dout).
        gated: ``h = act(gate) * up``.

    Returns:
        (T, Dout) in x's dtype; tokens without assignments are zero.
    """
    get_activation(activation)  # the same ValueError as the torch backend for unknown names
    plan = _make_plan(token, expert, x.shape[0], w_in.shape[0])
    return _ExpertMLPFunction.apply(x, weight, w_in, w_out, b_in, b_out, plan, _ACT_CODES[activation], gated)
