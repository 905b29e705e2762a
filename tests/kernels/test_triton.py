"""The Triton expert MLP kernels against the torch backend and a naive per-assignment loop.

The kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, the default here), or
compiled on CUDA when the suite runs with ``TRITON_INTERPRET=0`` on a machine with a GPU.
"""

import os

# Before triton is first imported: the interpreter is chosen when a function is decorated with
# triton.jit, triton's own helpers (tl.cdiv, tl.sum, ...) included, i.e. at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moezoo.kernels import ACTIVATIONS, expert_mlp  # noqa: E402
from moezoo.kernels import triton_backend as tb  # noqa: E402
from moezoo.kernels.sorting import sort_by_expert  # noqa: E402
from moezoo.kernels.torch_backend import expert_mlp_torch  # noqa: E402
from moezoo.routers.routing import Routing  # noqa: E402

INTERPRET = bool(triton.knobs.runtime.interpret)
# Another test module imported triton before the variable above was set: triton's helpers and
# the kernels are then compiled-mode functions the interpreter cannot call, in this process.
STALE_IMPORT = INTERPRET and (isinstance(tl.cdiv, triton.runtime.jit.JITFunction) or not tb.INTERPRET)
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
# Tiles of the interpreter config; the shapes below are chosen to span several of them.
BLOCK = 16


@pytest.fixture(autouse=True)
def _kernels_can_run(request):
    """Skip where the kernels cannot run in this process; test_in_a_fresh_process covers that case."""
    if request.node.originalname == "test_in_a_fresh_process":
        return
    if STALE_IMPORT:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: test_in_a_fresh_process runs this file")
    if DEVICE is None:
        pytest.skip("TRITON_INTERPRET=0 was set explicitly and there is no CUDA device to run the kernels")


def test_in_a_fresh_process():
    """When triton was imported too early for the interpreter, this file's tests run in a new
    process (with the interpreter) and any failure there fails here."""
    if not STALE_IMPORT:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
               "-k", "not test_in_a_fresh_process"]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


# --- helpers ------------------------------------------------------------------------------------
def _routing(num_tokens: int, num_experts: int, k: int, empty: tuple[int, ...], seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven top-k assignments, shuffled: ``empty`` experts get none, one expert gets most, about a
    quarter of the choices and all of token 0 are dropped, and one (token, expert) pair repeats."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.rand(num_experts, generator=g) + 0.1
    popularity[min(set(range(num_experts)) - set(empty))] = 8.0
    popularity[list(empty)] = 0.0
    expert = torch.multinomial(popularity.expand(num_tokens, -1), k, generator=g)  # distinct per token
    token = torch.arange(num_tokens).unsqueeze(1).expand(-1, k)
    keep = torch.rand(num_tokens, k, generator=g) > 0.25
    keep[0] = False
    token, expert = token[keep], expert[keep]
    token, expert = torch.cat([token, token[:1]]), torch.cat([expert, expert[:1]])
    perm = torch.randperm(token.numel(), generator=g)
    return token[perm], expert[perm]


def _params(num_tokens, dim, hidden, dim_out, num_experts, num_assignments, *, gated, b_in, b_out, seed,
            strided=False, dtype=torch.float32):
    """x, weight, w_in, w_out, b_in, b_out as leaves (None for absent biases), on DEVICE.

    With ``strided`` x and w_in are non-contiguous views (a column stride of 2, a transposed w_in).
    """
    g = torch.Generator().manual_seed(seed)
    width = 2 * hidden if gated else hidden

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    x = rand(num_tokens, 2 * dim)[:, ::2] if strided else rand(num_tokens, dim)
    if strided:
        w_in = rand(num_experts, width, dim, scale=dim**-0.5).transpose(1, 2)
    else:
        w_in = rand(num_experts, dim, width, scale=dim**-0.5)
    tensors = [
        x,
        torch.rand(num_assignments, generator=g).to(DEVICE),  # fp32 combine weights, whatever dtype x has
        w_in,
        rand(num_experts, hidden, dim_out, scale=hidden**-0.5),
        rand(num_experts, width) if b_in else None,
        rand(num_experts, dim_out) if b_out else None,
    ]
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def _naive(x, token, expert, weight, w_in, w_out, activation, b_in, b_out, gated):
    """The definition, one assignment at a time."""
    act = ACTIVATIONS[activation]
    hidden = w_out.shape[1]
    rows = [x.new_zeros(w_out.shape[2]) for _ in range(x.shape[0])]
    for a in range(token.numel()):
        t, e = int(token[a]), int(expert[a])
        z = x[t] @ w_in[e] + (0 if b_in is None else b_in[e])
        h = act(z[:hidden]) * z[hidden:] if gated else act(z)
        y = h @ w_out[e] + (0 if b_out is None else b_out[e])
        rows[t] = rows[t] + weight[a].to(y.dtype) * y
    return torch.stack(rows)


def _run(fn, inputs, token, expert, activation, gated, grad_out, **kwargs):
    """fn's output and the gradient of <output, grad_out> w.r.t. every input (zeros where unused).

    A fallback of the Triton backend to torch is an error here: it would match trivially.
    """
    x, weight, w_in, w_out, b_in, b_out = inputs
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="expert_mlp_triton")
        out = fn(x, token, expert, weight, w_in, w_out, activation, b_in=b_in, b_out=b_out, gated=gated, **kwargs)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True))
    return out, [None if t is None else _or_zeros(next(grads), t) for t in inputs]


def _or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _as_double(inputs):
    return [None if t is None else t.detach().double().requires_grad_() for t in inputs]


def _assert_close(actual, expected, rtol, name):
    """Elementwise rtol, plus rtol of the largest magnitude as absolute slack (for near-zero entries)."""
    expected = expected.to(device=actual.device, dtype=torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


NAMES = ("out", "d x", "d weight", "d w_in", "d w_out", "d b_in", "d b_out")


def _check_against_references(activation, gated, b_in, b_out, dims, *, empty=(2, 5), strided=False, seed=0, rtol=1e-5):
    num_tokens, dim, hidden, dim_out, num_experts, k = dims
    token, expert = _routing(num_tokens, num_experts, k, empty=empty, seed=seed)
    token, expert = token.to(DEVICE), expert.to(DEVICE)
    inputs = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(), gated=gated, b_in=b_in,
                     b_out=b_out, seed=seed, strided=strided)
    grad_out = torch.randn(num_tokens, dim_out, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)

    out, grads = _run(tb.expert_mlp_triton, inputs, token, expert, activation, gated, grad_out)
    torch_out, torch_grads = _run(expert_mlp_torch, inputs, token, expert, activation, gated, grad_out)
    naive_out, naive_grads = _run(_naive, _as_double(inputs), token, expert, activation, gated, grad_out.double())

    assert out.shape == (num_tokens, dim_out) and out.dtype == inputs[0].dtype
    assert not out[0].any(), "token 0 has no assignment: its row must be zero"
    references = zip([torch_out, *torch_grads], [naive_out, *naive_grads])
    for name, got, (via_torch, via_naive) in zip(NAMES, [out, *grads], references):
        if got is None:
            continue
        _assert_close(got, via_torch, rtol, f"{name} vs torch backend")
        _assert_close(got, via_naive, rtol, f"{name} vs naive loop")
    return token, expert


# --- expert MLP: exactness in fp32 --------------------------------------------------------------
# (tokens, dim, hidden, dim_out, experts, k): dims not multiples of the 16-wide tiles.
RAGGED = (24, 19, 23, 17, 6, 2)


@pytest.mark.parametrize(
    "activation, gated, b_in, b_out",
    [
        ("gelu", False, True, True),
        ("gelu", True, False, False),
        ("gelu_tanh", False, False, True),
        ("gelu_tanh", True, True, False),
        ("silu", False, True, False),
        ("silu", True, True, True),
        ("relu", False, False, False),
        ("relu", True, False, True),
    ],
)
def test_forward_and_every_gradient_match_torch_and_naive(activation, gated, b_in, b_out):
    token, expert = _check_against_references(activation, gated, b_in, b_out, RAGGED)
    counts = torch.bincount(expert.cpu(), minlength=RAGGED[4])
    # The routing really covers the cases it is meant to: empty experts, an expert spanning several
    # row blocks, tokens chosen several times, dropped tokens.
    assert (counts == 0).sum() >= 2 and counts.max() > BLOCK
    assert torch.bincount(token.cpu()).max() > 1 and torch.bincount(token.cpu(), minlength=RAGGED[0])[0] == 0


def test_block_multiple_dims_and_strided_inputs():
    """K a multiple of the tile (the unmasked EVEN_K loop), non-contiguous x and w_in."""
    _check_against_references("silu", True, True, True, (20, 32, 16, 48, 5, 3), empty=(4,), strided=True, seed=3)


def test_single_expert():
    _check_against_references("gelu", False, True, True, (9, 19, 23, 17, 1, 1), empty=(), seed=4)


def test_no_assignments_gives_zeros_and_zero_grads():
    inputs = _params(5, 19, 23, 17, 3, 0, gated=True, b_in=True, b_out=True, seed=5)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out, grads = _run(tb.expert_mlp_triton, inputs, empty, empty, "silu", True, torch.ones(5, 17, device=DEVICE))
    assert out.shape == (5, 17) and not out.any()
    for grad, leaf in zip(grads, inputs):
        assert grad.shape == leaf.shape and not grad.any()


def test_autotuning_over_block_n_keeps_d_weight_exact(monkeypatch):
    """Kernel 3's d weight partials (one row per column tile) are summed afterwards: a config tried
    while autotuning with a smaller BLOCK_N fills rows the chosen one does not overwrite. The real
    kernel's reset_to_zero must clear them (the interpreter has one config, so force two here)."""
    real = tb._mlp_in_grad_kernel
    configs = [
        triton.Config({"BLOCK_M": BLOCK, "BLOCK_N": n, "BLOCK_K": BLOCK, "GROUP_M": 8}, num_warps=4, num_stages=1)
        for n in (BLOCK, 2 * BLOCK)
    ]
    timings = iter([2.0, 1.0])  # the smaller tile runs first and loses

    def do_bench(kernel_call, quantiles):
        kernel_call()
        return [next(timings)] * len(quantiles)

    tuned = triton.autotune(configs, key=["N"], reset_to_zero=real.reset_to_zero, do_bench=do_bench)(real.fn)
    monkeypatch.setattr(tb, "_mlp_in_grad_kernel", tuned)
    monkeypatch.setattr(tb, "_MIN_BLOCK_N", BLOCK)
    _check_against_references("gelu", False, False, True, (12, 19, 40, 17, 3, 2), empty=(), seed=10)
    assert tuned.best_config.kwargs["BLOCK_N"] == 2 * BLOCK


# --- expert MLP: 16-bit inputs ------------------------------------------------------------------
# bf16 is looser: the interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even),
# which about doubles its error; with correct rounding (fp16) the kernels beat the torch backend.
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_low_precision_forward_and_backward(dtype, rtol):
    num_tokens, dim, hidden, dim_out, num_experts, k = RAGGED
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(1,), seed=6))
    inputs = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(), gated=True, b_in=True,
                     b_out=True, seed=6, dtype=dtype)
    grad_out = torch.randn(num_tokens, dim_out, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out, grads = _run(tb.expert_mlp_triton, inputs, token, expert, "silu", True, grad_out)
    naive_out, naive_grads = _run(_naive, _as_double(inputs), token, expert, "silu", True, grad_out.double())
    assert out.dtype == dtype and grads[1].dtype == torch.float32  # d weight keeps the router's dtype
    for name, got, expected in zip(NAMES, [out, *grads], [naive_out, *naive_grads]):
        _assert_close(got, expected, rtol, name)


# --- public entry point and fallbacks -----------------------------------------------------------
def test_expert_mlp_entry_point_with_triton_backend():
    num_tokens, dim, hidden, dim_out, num_experts, k = RAGGED
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(0,), seed=8))
    x, weight, w_in, w_out, b_in, b_out = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(),
                                                  gated=False, b_in=True, b_out=True, seed=8)
    routing = Routing(token, expert, weight, num_tokens, num_experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels run: no fallback warning
        out = expert_mlp(x, routing, w_in, w_out, "gelu_tanh", b_in=b_in, b_out=b_out, dropout=0.1, backend="triton")
    expected = expert_mlp(x, routing, w_in, w_out, "gelu_tanh", b_in=b_in, b_out=b_out, backend="torch")
    _assert_close(out, expected, 1e-5, "out")


def _fallback_call(dtype=torch.float32, **kwargs):
    """A function running a given backend on one fixed gated problem with ``kwargs``."""
    num_tokens, dim, hidden, dim_out, num_experts, k = RAGGED
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(0,), seed=9))
    x, weight, w_in, w_out, b_in, b_out = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(),
                                                  gated=True, b_in=True, b_out=False, seed=9, dtype=dtype)
    args = (x, token, expert, weight, w_in, w_out, "silu")
    return lambda fn: fn(*args, b_in=b_in, b_out=b_out, gated=True, **kwargs)


def _warns_once(call, match):
    """call() warns (matching) the first time and not the second; returns the first result."""
    with pytest.warns(UserWarning, match=match):
        first = call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()
    return first


def test_dropout_in_training_falls_back_to_torch_and_warns_once(monkeypatch):
    monkeypatch.setattr(tb, "_WARNED", set())
    call = _fallback_call(dropout=0.5, training=True)

    def seeded(fn):
        torch.manual_seed(11)
        return call(fn)

    out = _warns_once(lambda: seeded(tb.expert_mlp_triton), "dropout")
    torch.testing.assert_close(out, seeded(expert_mlp_torch), rtol=0, atol=0)


def test_unsupported_dtype_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(tb, "_WARNED", set())
    call = _fallback_call(dtype=torch.float64)
    out = _warns_once(lambda: call(tb.expert_mlp_triton), "dtypes")
    torch.testing.assert_close(out, call(expert_mlp_torch), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="needs CPU tensors in the interpreter")
def test_cpu_tensors_without_interpreter_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(tb, "_WARNED", set())
    monkeypatch.setattr(tb, "INTERPRET", False)
    call = _fallback_call()
    out = _warns_once(lambda: call(tb.expert_mlp_triton), "need CUDA")
    torch.testing.assert_close(out, call(expert_mlp_torch), rtol=0, atol=0)


# --- bookkeeping -------------------------------------------------------------------------------
def test_sort_by_expert():
    expert = torch.tensor([3, 0, 3, 1, 0, 3, 5, 1], device=DEVICE)
    order, counts, offsets = sort_by_expert(expert, 7)
    assert torch.equal(order, torch.argsort(expert, stable=True))
    assert counts.tolist() == [2, 2, 0, 3, 0, 1, 0]
    assert offsets.tolist() == [0, 2, 4, 4, 7, 7, 8, 8]
    order, counts, offsets = sort_by_expert(expert[:0], 3)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0] and offsets.tolist() == [0, 0, 0, 0]


# --- Hopper code generation, without a GPU --------------------------------------------------------
def _compile_for_hopper(kernel, pointers, constexprs, unit_strides, config=None):
    """Compile ``kernel`` for sm_90a as a launch would: pointers 16-byte aligned, unit strides
    specialised to 1 (which is what lets loads vectorise into pipelined cp.async); returns
    (shared memory bytes, uses wgmma)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    constants = {**constexprs, **(config.kwargs if config else {})}
    constants.update({name: 1 for name in unit_strides})
    constants.update({name: None for name, ty in pointers.items() if ty is None})
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if pointers.get(name)}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {"num_warps": 4}
    source = ASTSource(fn, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.metadata.shared, "wgmma" in compiled.asm["ptx"]


def _hopper_compile_cases(dtype):
    """(kernel, pointer types, constexprs, unit strides) covering every flag combination in use."""
    ptr = f"*{dtype}"
    dots = {"UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    rows = {"tok_ptr": "*i64", "offsets_ptr": "*i64"}
    unit = ("stride_ak", "stride_wn", "stride_bn", "stride_zn", "stride_on")
    for gather, act, gated, bias, scale, store_z, even_k, experts in [
        (True, 3, True, False, False, True, True, 8),  # forward GEMM 1, SwiGLU, training
        (True, 1, False, True, False, False, False, 64),  # forward GEMM 1, GELU, inference
        (False, 0, False, True, True, False, True, 1),  # forward GEMM 2, a single expert
    ]:
        pointers = {"a_ptr": ptr, **rows, "w_ptr": ptr, "b_ptr": ptr if bias else None,
                    "scale_ptr": "*fp32" if scale else None, "z_ptr": ptr if store_z else None, "out_ptr": ptr}
        flags = dict(GATHER=gather, ACT=act, GATED=gated, HAS_BIAS=bias, HAS_SCALE=scale, STORE_Z=store_z,
                     E_POW2=experts, EVEN_K=even_k)
        yield tb._grouped_mm_kernel, pointers, {**flags, **dots}, unit
    # dx = dz @ w_in^T: the weight is read transposed, unit stride along K
    pointers = {"a_ptr": ptr, **rows, "w_ptr": ptr, "b_ptr": None, "scale_ptr": None, "z_ptr": None, "out_ptr": ptr}
    flags = dict(GATHER=False, ACT=0, GATED=False, HAS_BIAS=False, HAS_SCALE=False, STORE_Z=False, E_POW2=64,
                 EVEN_K=True)
    yield tb._grouped_mm_kernel, pointers, {**flags, **dots}, ("stride_ak", "stride_wk", "stride_on")
    for act, gated in [(3, True), (1, False), (2, False), (4, True)]:
        pointers = {"dout_ptr": ptr, **rows, "w_ptr": ptr, "weight_ptr": "*fp32", "z_ptr": ptr, "h_ptr": ptr,
                    "dz_ptr": ptr, "part_ptr": "*fp32"}
        flags = dict(ACT=act, GATED=gated, STORE_H=True, E_POW2=64, EVEN_K=False)
        unit_strides = ("stride_dk", "stride_wk", "stride_zn", "stride_hn", "stride_dzn")
        yield tb._mlp_in_grad_kernel, pointers, {**flags, **dots}, unit_strides
    for gather_l, scale in [(True, False), (False, True)]:
        pointers = {"l_ptr": ptr, "r_ptr": ptr, **rows, "scale_ptr": "*fp32" if scale else None, "dw_ptr": ptr}
        flags = dict(GATHER_L=gather_l, GATHER_R=not gather_l, HAS_SCALE=scale)
        yield tb._grouped_wgrad_kernel, pointers, {**flags, **dots}, ("stride_lp", "stride_rq", "stride_dq")


def _tile_footprint(config) -> int:
    """Elements of the operand tiles a config keeps in flight (proportional to its shared memory)."""
    m, n, k = (v for name, v in config.kwargs.items() if name != "GROUP_M")
    return (m * k + k * n) * config.num_stages


def _compile_every_kernel_for_hopper() -> None:
    """Every autotune config in bf16, the smallest one in fp16 and fp32, and the small kernels."""
    smem_limit = 232448  # bytes of shared memory per block on sm_90
    for dtype in ("bf16", "fp16", "fp32"):
        for kernel, pointers, constexprs, unit in _hopper_compile_cases(dtype):
            name = f"{kernel.base_fn.__name__} {dtype} {constexprs}"
            configs = kernel.configs if dtype == "bf16" else [min(kernel.configs, key=_tile_footprint)]
            fits = []
            for config in configs:
                smem, wgmma = _compile_for_hopper(kernel, pointers, constexprs, unit, config)
                assert wgmma or dtype == "fp32", f"{name} {config}: no wgmma"
                fits.append(smem <= smem_limit)
            assert any(fits), f"no config of {name} fits in shared memory"
        pointers = {"r_ptr": f"*{dtype}", "tok_ptr": "*i64", "offsets_ptr": "*i64", "scale_ptr": "*fp32",
                    "db_ptr": f"*{dtype}"}
        flags = dict(GATHER=True, HAS_SCALE=True, BLOCK_M=tb._ROW_BLOCK, BLOCK_Q=tb._COL_BLOCK)
        _compile_for_hopper(tb._segment_colsum_kernel, pointers, flags, ("stride_rq", "stride_dq"))
        pointers = {"y_ptr": f"*{dtype}", "by_token_ptr": "*i64", "token_offsets_ptr": "*i64", "out_ptr": f"*{dtype}"}
        flags = dict(BLOCK_N=tb._TOKEN_BLOCK)
        _compile_for_hopper(tb._sum_by_token_kernel, pointers, flags, ("stride_yn", "stride_on"))


@pytest.mark.slow
def test_every_kernel_config_compiles_for_hopper():
    """ptxas for sm_90a accepts every kernel in every autotune config (the interpreter checks none of
    that: tl.dot shapes, shared memory, wgmma lowering). Needs no GPU; runs with the interpreter off."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_triton; "
            "test_triton._compile_every_kernel_for_hopper()")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
