"""The PyTorch expert computation against a naive per-assignment loop, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moezoo.kernels import expert_mlp
from moezoo.routers import Routing
from tests.conftest import naive_expert_mlp


def make_case(tokens, experts, k, dim, hidden, gated, bias, drop, seed, dim_out=None):
    g = torch.Generator().manual_seed(seed)
    dim_out = dim_out or dim
    width = hidden * (2 if gated else 1)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    w_in = torch.randn(experts, dim, width, generator=g, dtype=torch.float64) / dim**0.5
    w_out = torch.randn(experts, hidden, dim_out, generator=g, dtype=torch.float64) / hidden**0.5
    b_in = torch.randn(experts, width, generator=g, dtype=torch.float64) if bias else None
    b_out = torch.randn(experts, dim_out, generator=g, dtype=torch.float64) if bias else None
    # k distinct experts per token, then drop a random subset of assignments (capacity drops).
    expert = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).reshape(-1)
    token = torch.arange(tokens).repeat_interleave(k)
    keep = torch.rand(token.numel(), generator=g) >= drop
    token, expert = token[keep], expert[keep]
    weight = torch.rand(token.numel(), generator=g, dtype=torch.float64)
    return x, token, expert, weight, w_in, w_out, b_in, b_out


def run_both(case, activation, gated):
    x, token, expert, weight, w_in, w_out, b_in, b_out = case
    leaves = [t for t in (x, weight, w_in, w_out, b_in, b_out) if t is not None]
    results = []
    for fn in ("ours", "naive"):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(copies)
        xx, ww, wi, wo = next(it), next(it), next(it), next(it)
        bi = next(it) if b_in is not None else None
        bo = next(it) if b_out is not None else None
        if fn == "ours":
            routing = Routing(token, expert, ww, x.shape[0], w_in.shape[0])
            out = expert_mlp(xx, routing, wi, wo, activation, b_in=bi, b_out=bo, gated=gated, backend="torch")
        else:
            out = naive_expert_mlp(xx, token, expert, ww, wi, wo, activation, bi, bo, gated)
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        if out.requires_grad:  # the naive loop builds no graph when every assignment is dropped
            out.backward(grad_out)
        results.append((out.detach(), [c.grad for c in copies]))
    return results


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(1, 6),
    k=st.integers(1, 3),
    dim=st.integers(1, 9),
    hidden=st.integers(1, 7),
    gated=st.booleans(),
    bias=st.booleans(),
    drop=st.sampled_from([0.0, 0.3, 1.0]),
    activation=st.sampled_from(["gelu", "gelu_tanh", "silu", "relu"]),
    seed=st.integers(0, 10_000),
)
def test_torch_backend_matches_naive_loop(tokens, experts, k, dim, hidden, gated, bias, drop, activation, seed):
    k = min(k, experts)
    (out, grads), (ref, ref_grads) = run_both(make_case(tokens, experts, k, dim, hidden, gated, bias, drop, seed),
                                               activation, gated)
    assert torch.allclose(out, ref, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert torch.allclose(g, r, atol=1e-10)


def test_empty_experts_single_token_and_dropped_rows():
    case = make_case(1, 5, 1, 4, 3, False, True, 0.0, 0)
    (out, _), (ref, _) = run_both(case, "gelu", False)
    assert torch.allclose(out, ref)
    # every assignment dropped: output is all zeros, gradients exist and are zero
    x, token, expert, weight, w_in, w_out, b_in, b_out = make_case(6, 3, 2, 4, 3, True, True, 1.0, 1)
    assert token.numel() == 0
    routing = Routing(token, expert, weight, 6, 3)
    out = expert_mlp(x, routing, w_in, w_out, "silu", b_in=b_in, b_out=b_out, gated=True, backend="torch")
    assert torch.equal(out, torch.zeros_like(out))


def test_dim_out_may_differ_from_dim():
    case = make_case(5, 3, 2, 4, 6, False, True, 0.0, 3, dim_out=7)
    (out, grads), (ref, ref_grads) = run_both(case, "relu", False)
    assert out.shape == (5, 7) and torch.allclose(out, ref)


def test_auto_backend_is_torch_on_cpu():
    from moezoo.kernels import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda-magic", torch.zeros(1))


def test_shape_errors_name_the_argument():
    x, token, expert, weight, w_in, w_out, *_ = make_case(4, 3, 1, 4, 5, False, False, 0.0, 0)
    routing = Routing(token, expert, weight, 4, 3)
    with pytest.raises(ValueError, match="w_in must have shape"):
        expert_mlp(x, routing, w_in[:, :3], w_out)
    with pytest.raises(ValueError, match="routing is for 4 tokens"):
        expert_mlp(x[:3], routing, w_in, w_out)
    with pytest.raises(ValueError, match="activation must be one of"):
        expert_mlp(x, routing, w_in, w_out, "swish-ish")
    with pytest.raises(ValueError, match="even w_in width"):
        expert_mlp(x, routing, w_in, w_out[:, :2], gated=True)
