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


def _single_projection_reference(x, token, expert, weight, w_in, b_in, activation, gated):
    """``out[t] = sum_a weight[a] * act(x[t] @ w_in[e] + b_in[e])`` (gated: ``act(g) * u``), one
    assignment at a time."""
    act = {"identity": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    out = torch.zeros(x.shape[0], w_in.shape[-1] // (2 if gated else 1), dtype=x.dtype)
    for a in range(token.numel()):
        t, e = int(token[a]), int(expert[a])
        h = x[t] @ w_in[e] + (b_in[e] if b_in is not None else 0)
        if gated:
            g, u = h.chunk(2)
            h = act(g) * u
        else:
            h = act(h)
        out = out.index_add(0, torch.tensor([t]), (weight[a] * h).unsqueeze(0))
    return out


# Assignments over 5 tokens: token 1 has none, token 2 has three (two of them to the same expert),
# and with 4 experts the first and the last get no rows.
_TOKEN = torch.tensor([2, 0, 2, 4, 2, 3])
_EXPERT_OF_4 = torch.tensor([1, 2, 1, 2, 2, 1])


@pytest.mark.parametrize("experts", [4, 1])
@pytest.mark.parametrize(
    "gated, bias, activation, two_layers, x_grad",
    [
        (True, False, "silu", True, True),
        (True, True, "gelu_tanh", True, False),
        (True, True, "relu", True, True),
        (False, True, "relu", True, True),
        (False, False, "gelu", True, True),
        (False, True, "identity", False, True),
        (False, False, "relu", False, False),
        (True, True, "gelu", False, True),
        (True, False, "identity", False, True),
    ],
)
def test_grouped_path_edge_assignments(experts, gated, bias, activation, two_layers, x_grad):
    """Empty experts at both ends, a token without and one with three assignments, a repeated
    (token, expert) pair, a single expert, with and without biases, one or two projections."""
    g = torch.Generator().manual_seed(experts)
    dim, hidden, dim_out = 3, 4, 5
    width = hidden * (2 if gated else 1)
    expert = _EXPERT_OF_4 if experts == 4 else torch.zeros_like(_TOKEN)
    leaves = {
        "x": torch.randn(5, dim, generator=g, dtype=torch.float64),
        "weight": torch.rand(_TOKEN.numel(), generator=g, dtype=torch.float64),
        "w_in": torch.randn(experts, dim, width, generator=g, dtype=torch.float64),
        "b_in": torch.randn(experts, width, generator=g, dtype=torch.float64) if bias else None,
        "w_out": torch.randn(experts, hidden, dim_out, generator=g, dtype=torch.float64) if two_layers else None,
        "b_out": torch.randn(experts, dim_out, generator=g, dtype=torch.float64) if bias and two_layers else None,
    }
    grad_out = torch.randn(5, dim_out if two_layers else hidden, generator=g, dtype=torch.float64)
    def run(ours: bool):
        p = {k: None if v is None else v.clone().requires_grad_(k != "x" or x_grad) for k, v in leaves.items()}
        if ours:
            out = expert_mlp(p["x"], Routing(_TOKEN, expert, p["weight"], 5, experts), p["w_in"], p["w_out"],
                             activation, b_in=p["b_in"], b_out=p["b_out"], gated=gated, backend="torch")
        elif two_layers:
            out = naive_expert_mlp(p["x"], _TOKEN, expert, p["weight"], p["w_in"], p["w_out"],
                                   activation, p["b_in"], p["b_out"], gated)
        else:
            out = _single_projection_reference(p["x"], _TOKEN, expert, p["weight"], p["w_in"], p["b_in"],
                                               activation, gated)
        out.backward(grad_out)
        return out.detach(), {k: v.grad for k, v in p.items() if v is not None}

    (out, grads), (ref, ref_grads) = run(True), run(False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # inference keeps no pre-activations: same result
        routing = Routing(_TOKEN, expert, leaves["weight"], 5, experts)
        torch.testing.assert_close(
            expert_mlp(leaves["x"], routing, leaves["w_in"], leaves["w_out"], activation, b_in=leaves["b_in"],
                       b_out=leaves["b_out"], gated=gated, backend="torch"), out, rtol=0, atol=0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # token 1 has no assignment
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:
            assert grads[name] is None
            continue
        torch.testing.assert_close(grads[name], ref_grad, rtol=0, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    if experts == 4:
        for name in ("w_in", "b_in", "w_out", "b_out"):
            if grads.get(name) is not None:  # experts 0 and 3 saw no rows: exactly zero gradients
                assert torch.count_nonzero(grads[name][[0, 3]]) == 0


@pytest.mark.parametrize("gated, two_layers", [(True, True), (False, True), (False, False)])
def test_dropout_backward_matches_finite_differences(gated, two_layers):
    """The hand-written backward with dropout masks, against numerical derivatives (same masks:
    the generator is reseeded before every call)."""
    x, token, expert, weight, w_in, w_out, b_in, b_out = make_case(6, 3, 2, 4, 3, gated, True, 0.3, 5)
    if not two_layers:
        w_out = b_out = None

    def f(x, weight, w_in, b_in, *out_params):
        torch.manual_seed(0)
        w_o, b_o = out_params or (None, None)
        routing = Routing(token, expert, weight, x.shape[0], w_in.shape[0])
        return expert_mlp(x, routing, w_in, w_o, "gelu", b_in=b_in, b_out=b_o, gated=gated, dropout=0.4,
                          training=True, backend="torch")

    inputs = [t.clone().requires_grad_() for t in (x, weight, w_in, b_in, w_out, b_out) if t is not None]
    assert torch.autograd.gradcheck(f, inputs)
    out = f(*inputs)
    assert 0 < torch.count_nonzero(out) < out.numel()  # some, not all, outputs dropped


def test_grouped_mm_path_matches_naive_loop(monkeypatch):
    """The ``torch._grouped_mm`` path (CUDA bf16 on Hopper) on the CPU in fp32, with an empty expert."""
    import moezoo.kernels.torch_backend as tb

    monkeypatch.setattr(tb, "grouped_mm_available", lambda x, w: True)
    case = [t.float() if t.is_floating_point() else t for t in make_case(9, 4, 2, 8, 4, True, True, 0.2, 6)]
    x, token, expert, weight, w_in, w_out, b_in, b_out = case
    expert = torch.where(expert == 2, 3, expert)  # expert 2 gets no rows
    leaves = [t.clone().requires_grad_() for t in (x, weight, w_in, w_out, b_in, b_out)]
    out = expert_mlp(leaves[0], Routing(token, expert, leaves[1], 9, 4), leaves[2], leaves[3], "silu",
                     b_in=leaves[4], b_out=leaves[5], gated=True, backend="torch")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, w_in, w_out, b_in, b_out)]
    ref = naive_expert_mlp(ref_leaves[0], token, expert, ref_leaves[1], ref_leaves[2], ref_leaves[3], "silu",
                           ref_leaves[4], ref_leaves[5], True)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, theirs.grad.float(), rtol=1e-5, atol=1e-5)


def test_activation_kernels_cover_every_activation():
    from moezoo.kernels import ACTIVATIONS
    from moezoo.kernels.torch_backend import _ACTIVATION_OUT

    assert set(_ACTIVATION_OUT) == set(ACTIVATIONS)
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name, (act_out, _) in _ACTIVATION_OUT.items():
        torch.testing.assert_close(act_out(z, torch.empty_like(z)), ACTIVATIONS[name](z), rtol=0, atol=0)


def test_dropout_must_be_a_probability_below_one():
    x, token, expert, weight, w_in, w_out, *_ = make_case(4, 3, 1, 4, 5, False, False, 0.0, 0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        expert_mlp(x, Routing(token, expert, weight, 4, 3), w_in, w_out, dropout=1.0, backend="torch")
