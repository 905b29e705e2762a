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

from moezoo import kernels  # noqa: E402
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


@pytest.fixture(autouse=True)
def _first_kept_config_on_gpu(monkeypatch):
    """Compiled, each launch runs the first config its rules keep (the largest tiles) instead of
    autotuning: compiling every config for every test's flags would take minutes. The benchmark
    autotunes for real and checks the chosen configs' agreement with the torch backend."""
    if DEVICE != "cuda":
        return
    for name, kernel in vars(tb).items():
        rules = getattr(kernel, "early_config_prune", None) if name.endswith("_kernel") else None
        if rules is not None:
            monkeypatch.setattr(kernel, "early_config_prune",
                                lambda configs, named_args, rules=rules, **kwargs: rules(configs, named_args, **kwargs)[:1])


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


LEAVES = ("x", "weight", "w_in", "w_out", "b_in", "b_out")


def _params(num_tokens, dim, hidden, dim_out, num_experts, num_assignments, *, gated, b_in, b_out, seed,
            strided=False, dtype=torch.float32, trained=LEAVES):
    """x, weight, w_in, w_out, b_in, b_out as leaves (None for absent biases), on DEVICE; those
    named in ``trained`` require gradients.

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
    return [None if t is None else t.detach().requires_grad_(name in trained) for name, t in zip(LEAVES, tensors)]


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
    """fn's output and the gradient of <output, grad_out> w.r.t. every input that requires one
    (zeros where unused, None for the others).

    A fallback of the Triton backend to torch is an error here: it would match trivially.
    """
    x, weight, w_in, w_out, b_in, b_out = inputs
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="expert_mlp_triton")
        out = fn(x, token, expert, weight, w_in, w_out, activation, b_in=b_in, b_out=b_out, gated=gated, **kwargs)
    trained = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, trained, grad_out.to(out.dtype), allow_unused=True))
    return out, [_or_zeros(next(grads), t) if t is not None and t.requires_grad else None for t in inputs]


def _or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _as_double(inputs):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


def _assert_close(actual, expected, rtol, name):
    """Elementwise rtol, plus rtol of the largest magnitude as absolute slack (for near-zero entries)."""
    expected = expected.to(device=actual.device, dtype=torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _count_calls(monkeypatch, name):
    """Wrap tb.<name> so its calls are counted in the returned list (one entry per call)."""
    calls, real = [], getattr(tb, name)

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, name, counted)
    return calls


NAMES = ("out", "d x", "d weight", "d w_in", "d w_out", "d b_in", "d b_out")


def _check_against_references(activation, gated, b_in, b_out, dims, *, empty=(2, 5), strided=False, seed=0, rtol=1e-5,
                              trained=LEAVES):
    num_tokens, dim, hidden, dim_out, num_experts, k = dims
    token, expert = _routing(num_tokens, num_experts, k, empty=empty, seed=seed)
    token, expert = token.to(DEVICE), expert.to(DEVICE)
    inputs = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(), gated=gated, b_in=b_in,
                     b_out=b_out, seed=seed, strided=strided, trained=trained)
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
def test_forward_and_every_gradient_match_torch_and_naive(activation, gated, b_in, b_out, monkeypatch):
    colsums = _count_calls(monkeypatch, "_segment_colsum")
    wgrads = _count_calls(monkeypatch, "_grouped_wgrad")
    token, expert = _check_against_references(activation, gated, b_in, b_out, RAGGED)
    # d b_in is summed inside the d w_in kernel; only d b_out has a pass of its own.
    assert [call.get("sum_dtype") for call in wgrads] == [None, torch.float32 if b_in else None]
    assert len(colsums) == int(b_out)
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


def test_biases_trained_alone(monkeypatch):
    """Only the biases learn (BitFit): their column sums run without any weight-gradient GEMM."""
    wgrads = _count_calls(monkeypatch, "_grouped_wgrad")
    _check_against_references("gelu", False, True, True, RAGGED, seed=13, trained=("b_in", "b_out"))
    assert not wgrads


def test_frozen_experts_give_input_and_router_gradients(monkeypatch):
    """Experts frozen: kernel 3 stores no weight * h and no weight gradient is computed."""
    wgrads = _count_calls(monkeypatch, "_grouped_wgrad")
    _check_against_references("silu", True, True, True, RAGGED, seed=14, trained=("x", "weight"))
    assert not wgrads


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


# --- fp32 precision -----------------------------------------------------------------------------
@pytest.fixture
def matmul_precision():
    """Sets torch.set_float32_matmul_precision for one test and restores it afterwards."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(setting, expected, matmul_precision):
    """As torch's CUDA matmuls: "high" and "medium" allow one TF32 pass, "highest" is exact; the
    16-bit types are not affected (their tl.dot ignores the setting)."""
    matmul_precision(setting)
    assert tb._precision(torch.float32) == expected
    assert tb._precision(torch.bfloat16) == tb._precision(torch.float16) == "tf32"


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's tl.dot is exact in fp32 whatever the precision")
def test_tf32_runs_on_tensor_cores_within_tf32_error(matmul_precision):
    """With "high", the compiled kernels round fp32 operands to TF32 (10 mantissa bits): within 1e-2
    of the float64 loop, and measurably further from it than exact fp32 is (< 1e-5)."""
    num_tokens, dim, hidden, dim_out, num_experts, k = RAGGED
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(1,), seed=15))
    inputs = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(), gated=True, b_in=True,
                     b_out=True, seed=15)
    grad_out = torch.randn(num_tokens, dim_out, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    naive_out, naive_grads = _run(_naive, _as_double(inputs), token, expert, "silu", True, grad_out.double())
    matmul_precision("high")
    out, grads = _run(tb.expert_mlp_triton, inputs, token, expert, "silu", True, grad_out)
    for name, got, expected in zip(NAMES, [out, *grads], [naive_out, *naive_grads]):
        _assert_close(got, expected, 1e-2, name)
    assert (out.double() - naive_out).abs().max() > 1e-5 * naive_out.abs().max()


# (tokens, dim, hidden, dim_out, experts, k): an expert spanning several 128-row blocks (its
# weight-gradient loop runs 7 blocks of 64 rows, longer than the pipelines), K tails of every GPU
# tile (200 = 3 * 64 + 8).
MEDIUM = (600, 200, 160, 136, 5, 2)


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU-sized tiles; in the interpreter this shape would take minutes")
@pytest.mark.parametrize("dtype, precision, rtol", [
    (torch.bfloat16, "highest", 3e-2), (torch.float16, "highest", 1e-2), (torch.float32, "high", 1e-2),
    (torch.float32, "highest", 1e-5),
])
@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu", False)])
def test_medium_shape_on_the_gpu(dtype, precision, rtol, activation, gated, matmul_precision):
    """Every output and gradient of the compiled kernels, with their real tiles and pipelines,
    against the torch backend run in float64."""
    num_tokens, dim, hidden, dim_out, num_experts, k = MEDIUM
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(3,), seed=17))
    inputs = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(), gated=gated, b_in=True,
                     b_out=True, seed=17, dtype=dtype)
    grad_out = torch.randn(num_tokens, dim_out, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    expected_out, expected_grads = _run(expert_mlp_torch, _as_double(inputs), token, expert, activation, gated,
                                        grad_out.double())
    matmul_precision(precision)
    out, grads = _run(tb.expert_mlp_triton, inputs, token, expert, activation, gated, grad_out)
    assert torch.bincount(expert.cpu()).max() > 3 * 128, "one expert must span several row blocks"
    for name, got, expected in zip(NAMES, [out, *grads], [expected_out, *expected_grads]):
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
    """A function running expert_mlp with a given backend on one fixed gated problem with ``kwargs``."""
    num_tokens, dim, hidden, dim_out, num_experts, k = RAGGED
    token, expert = (t.to(DEVICE) for t in _routing(num_tokens, num_experts, k, empty=(0,), seed=9))
    x, weight, w_in, w_out, b_in, b_out = _params(num_tokens, dim, hidden, dim_out, num_experts, token.numel(),
                                                  gated=True, b_in=True, b_out=False, seed=9, dtype=dtype)
    routing = Routing(token, expert, weight, num_tokens, num_experts)
    return lambda backend: expert_mlp(x, routing, w_in, w_out, "silu", b_in=b_in, gated=True, backend=backend,
                                      **kwargs)


def _warns_once(call, match):
    """call() warns (matching) the first time and not the second; returns the first result."""
    with pytest.warns(UserWarning, match=match):
        first = call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()
    return first


def test_dropout_in_training_runs_the_torch_backend_and_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "_WARNED", set())
    call = _fallback_call(dropout=0.5, training=True)

    def seeded(backend):
        torch.manual_seed(11)
        return call(backend)

    out = _warns_once(lambda: seeded("triton"), "dropout")
    torch.testing.assert_close(out, seeded("torch"), rtol=0, atol=0)


def test_unsupported_dtype_runs_the_torch_backend(monkeypatch):
    monkeypatch.setattr(kernels, "_WARNED", set())
    call = _fallback_call(dtype=torch.float64)
    out = _warns_once(lambda: call("triton"), "dtypes")
    torch.testing.assert_close(out, call("torch"), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="needs CPU tensors in the interpreter")
def test_cpu_tensors_without_interpreter_run_the_torch_backend(monkeypatch):
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setattr(kernels, "_triton_interpreting", lambda: False)
    call = _fallback_call()
    out = _warns_once(lambda: call("triton"), "need CUDA")
    assert kernels.resolve_backend("auto", torch.zeros(1)) == "torch"
    torch.testing.assert_close(out, call("torch"), rtol=0, atol=0)


# --- bookkeeping -------------------------------------------------------------------------------
def test_sort_by_expert():
    expert = torch.tensor([3, 0, 3, 1, 0, 3, 5, 1], device=DEVICE)
    order, counts, offsets = sort_by_expert(expert, 7)
    assert torch.equal(order, torch.argsort(expert, stable=True))
    assert counts.tolist() == [2, 2, 0, 3, 0, 1, 0]
    assert offsets.tolist() == [0, 2, 4, 4, 7, 7, 8, 8]
    order, counts, offsets = sort_by_expert(expert[:0], 3)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0] and offsets.tolist() == [0, 0, 0, 0]


# --- launch configs -----------------------------------------------------------------------------
HOPPER, AMPERE = tb._Target(90, 232448), tb._Target(80, 166912)


def _config(m, n, k, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config({names[0]: m, names[1]: n, names[2]: k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


def _gemm_args(dtype, gated, precision="tf32"):
    return {"a_ptr": torch.empty(0, dtype=dtype), "GATED": gated, "ACT": 3 if gated else 0, "PRECISION": precision}


def test_config_rules_count_shared_memory_per_stage_and_b_tile():
    """(BLOCK_M * BLOCK_K + b_tiles * BLOCK_K * BLOCK_N) * stages * element size, by hand."""
    config = _config(128, 256, 64, 8, 3)
    assert tb._GEMM_RULES.shared_memory(config, _gemm_args(torch.bfloat16, False)) == (8192 + 16384) * 3 * 2
    assert tb._GEMM_RULES.shared_memory(config, _gemm_args(torch.bfloat16, True)) == (8192 + 32768) * 3 * 2
    # fp32 is 4 bytes whatever the dot precision (TF32 reads the fp32 tiles)
    assert tb._GEMM_RULES.shared_memory(_config(128, 128, 32, 8, 3), _gemm_args(torch.float32, True)) == 147456


def test_config_rules_prune_what_the_target_cannot_hold():
    gated_bf16, gated_fp32 = _gemm_args(torch.bfloat16, True), _gemm_args(torch.float32, True)
    big = _config(128, 256, 64, 8, 3)  # gated bf16: 245760 bytes > 232448
    assert "245760 bytes" in tb._GEMM_RULES.rejection(big, gated_bf16, HOPPER)
    fp32_tile = _config(64, 64, 32, 4, 3)  # gated fp32: (2048 + 4096) * 3 * 4 = 73728 bytes
    assert tb._GEMM_RULES.rejection(fp32_tile, gated_fp32, AMPERE) is None
    assert "another element size" in tb._GEMM_RULES.rejection(fp32_tile, gated_bf16, AMPERE)  # 64-byte K rows
    # The weight-gradient kernel's K is its rows, not a contiguous dimension: no width rule there.
    wgrad = _config(64, 64, 32, 4, 4, names=("BLOCK_P", "BLOCK_Q", "BLOCK_K"))
    wgrad_args = {"l_ptr": torch.empty(0, dtype=torch.bfloat16), "PRECISION": "tf32", "db_ptr": None}
    assert tb._WGRAD_RULES.rejection(wgrad, wgrad_args, AMPERE) is None


def test_config_rules_prune_what_would_spill():
    """Accumulators per thread = BLOCK_M * BLOCK_N (* 2 gated) / (32 * num_warps), against the
    measured budget of the launch's role, target and dot."""
    gated_bf16 = _gemm_args(torch.bfloat16, True)
    assert tb._GEMM_RULES.accumulators(_config(128, 128, 64, 8, 4), gated_bf16) == 128
    assert "128 accumulators" in tb._GEMM_RULES.rejection(_config(128, 128, 64, 8, 4), gated_bf16, HOPPER)
    assert tb._GEMM_RULES.rejection(_config(128, 64, 64, 8, 4), gated_bf16, HOPPER) is None  # 64
    # A plain GEMM holds twice as many on sm_90 (128x256 on 8 warps), not on sm_80.
    plain_bf16 = _gemm_args(torch.bfloat16, False)
    assert tb._GEMM_RULES.rejection(_config(128, 256, 64, 8, 3), plain_bf16, HOPPER) is None
    assert "128 accumulators" in tb._GEMM_RULES.rejection(_config(128, 256, 64, 8, 3), plain_bf16, AMPERE)
    # Kernel 3 in TF32 keeps 16 (64x64 on 8 warps), 16-bit 32 (64x64 on 4 warps).
    epilogue = {"dout_ptr": torch.empty(0, dtype=torch.float32), "PRECISION": "tf32"}
    assert "32 accumulators" in tb._EPILOGUE_RULES.rejection(_config(64, 64, 32, 4, 3), epilogue, HOPPER)
    assert tb._EPILOGUE_RULES.rejection(_config(64, 64, 32, 8, 3), epilogue, HOPPER) is None
    # FMA dots (fp32 "highest"): 32-wide K tiles on 8 warps only.
    fma = _gemm_args(torch.float32, True, precision="ieee")
    assert tb._GEMM_RULES.rejection(_config(64, 64, 32, 8, 3), fma, AMPERE) is None
    assert "another element size or dot" in tb._GEMM_RULES.rejection(_config(64, 64, 32, 4, 3), fma, AMPERE)


def test_config_rules_say_why_nothing_fits(monkeypatch):
    """A device too small for every candidate gets an error naming it, not the autotuner's
    'first config' fallback that fails at launch."""
    monkeypatch.setattr(tb, "_device_target", lambda index: tb._Target(75, 65536))
    configs = [_config(128, 128, 32, 8, 3), _config(64, 64, 32, 4, 3)]
    gated = _gemm_args(torch.float32, True)  # the smaller config needs 73728 bytes gated, 49152 plain
    with pytest.raises(RuntimeError, match="no launch config fits this GPU"):
        tb._GEMM_RULES(configs, {"a_ptr": gated.pop("a_ptr")}, **gated)
    plain = _gemm_args(torch.float32, False)
    assert tb._GEMM_RULES(configs, {"a_ptr": plain.pop("a_ptr")}, **plain) == configs[1:]
