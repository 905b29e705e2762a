"""Under ``torch.autocast`` the expert GEMMs run in the autocast dtype on both backends, as
``nn.Linear`` does: output dtype and values against an fp64 reference of the bf16-rounded operands."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moezoo.kernels import expert_mlp  # noqa: E402
from moezoo.routers.routing import Routing  # noqa: E402
from tests.conftest import naive_expert_mlp  # noqa: E402


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens, dim, hidden, experts = 21, 24, 16, 4
    token = torch.arange(tokens).repeat(2)
    expert = torch.randint(0, experts, (2 * tokens,), generator=g)
    weight = torch.rand(2 * tokens, generator=g)
    x = torch.randn(tokens, dim, generator=g)
    w_in = torch.randn(experts, dim, 2 * hidden, generator=g) / dim**0.5
    w_out = torch.randn(experts, hidden, dim, generator=g) / hidden**0.5
    b_in, b_out = torch.randn(experts, 2 * hidden, generator=g) * 0.1, torch.randn(experts, dim, generator=g) * 0.1
    return Routing(token, expert, weight, tokens, experts), x, w_in, w_out, b_in, b_out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_experts_in_bf16_and_returns_bf16(backend):
    routing, x, w_in, w_out, b_in, b_out = _problem()
    params = [t.clone().requires_grad_() for t in (x, w_in, w_out, b_in, b_out)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expert_mlp(params[0], routing, params[1], params[2], "silu", b_in=params[3], b_out=params[4],
                         gated=True, backend=backend)
    assert out.dtype == torch.bfloat16
    # The reference: the GEMM operands rounded to bf16 (what autocast hands the kernels), math in fp64.
    rounded = [t.to(torch.bfloat16).double() for t in (x, w_in, w_out, b_in, b_out)]
    expected = naive_expert_mlp(rounded[0], routing.token, routing.expert, routing.weight.double(), rounded[1],
                                rounded[2], "silu", rounded[3], rounded[4], gated=True)
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() / scale < 2e-2
    # Far from the fp32 result's error would mean fp32 GEMMs were run (and the cast only at the end):
    # the bf16 result must be further from the exact fp32 answer than rounding the fp32 output is.
    exact = naive_expert_mlp(x.double(), routing.token, routing.expert, routing.weight.double(),
                             w_in.double(), w_out.double(), "silu", b_in.double(), b_out.double(), gated=True)
    assert (out.double() - exact).abs().max() > (exact.to(torch.bfloat16).double() - exact).abs().max()
    out.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)  # grads in the params' dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_autocast_the_inputs_dtype_is_kept(backend):
    routing, x, w_in, w_out, b_in, b_out = _problem(1)
    out = expert_mlp(x, routing, w_in, w_out, "gelu", b_in=b_in, b_out=b_out, gated=True, backend=backend)
    assert out.dtype == torch.float32
    expected = naive_expert_mlp(x.double(), routing.token, routing.expert, routing.weight.double(), w_in.double(),
                                w_out.double(), "gelu", b_in.double(), b_out.double(), gated=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
