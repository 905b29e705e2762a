"""Routing math against V-MoE's reference outputs, hand-worked cases and exact solvers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moezoo.routers import functional as RF


def dense(token, expert, weight, shape):
    out = torch.zeros(shape, dtype=torch.float64)
    out[token, expert] = weight.double()
    return out


# -- top_k_assign -----------------------------------------------------------------------------

def test_top_k_assign_golden_vmoe_table():
    """google-research/vmoe ``vmoe/moe_test.py`` (test_top_experts_per_item_expert_indices): S=3, E=3,
    k=2, capacity 2; the expected (expert, buffer) per (token, choice) are that test's."""
    gates = torch.tensor([[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]])
    tok, exp, w = RF.top_k_assign(gates, 2, capacity=2)
    kept = sorted(zip(tok.tolist(), exp.tolist()))
    # vanilla: t0 (0,0),(2,1); t1 (0,1),(2,2 dropped); t2 (2,0),(0,2 dropped)
    assert kept == [(0, 0), (0, 2), (1, 0), (2, 2)]
    tok, exp, w = RF.top_k_assign(gates, 2, capacity=2, batch_priority=True)
    kept = sorted(zip(tok.tolist(), exp.tolist()))
    # BPR: tokens claim places in order of their top-1 gate, t2 .6, t1 .5, t0 .4 -> first choices t2 (2,0),
    # t1 (0,0), t0 (0,1); second choices t2 -> 0 (buffer 2, dropped), t1 -> 2 (1), t0 -> 2 (2, dropped)
    assert kept == [(0, 0), (1, 0), (1, 2), (2, 2)]
    assert torch.allclose(dense(tok, exp, w, (3, 3)).float(), torch.tensor([[0.4, 0, 0], [0.5, 0, 0.4], [0, 0, 0.6]]))


@pytest.mark.parametrize("case", [f"case{i:02d}" for i in range(19)])
def test_top_k_assign_matches_vmoe(vmoe_reference, case):
    d = {k.split("/")[-1]: v for k, v in vmoe_reference.items() if k.startswith(f"dispatch/{case}/")}
    gates = torch.from_numpy(d["gates"])  # (G, S, E)
    groups, size, experts = gates.shape
    k, capacity = int(d["k"]), int(d["capacity"])
    if not bool(d["capacity_given"]):
        multiple = int(d["capacity_multiple_of"]) or None
        capacity_ours = RF.expert_capacity(size, experts, k, float(d["capacity_factor"]),
                                           multiple_of=multiple, rounding=str(d["capacity_ceil_or_round"]))
        assert capacity_ours == capacity
    tok, exp, w = RF.top_k_assign(gates.reshape(-1, experts), k, capacity, bool(d["batch_priority"]), group_size=size)
    expected = torch.from_numpy(d["combine_weights"]).sum(-1).reshape(-1, experts).double()
    assert torch.equal(dense(tok, exp, w, expected.shape), expected)


def test_top_k_assign_without_capacity_is_plain_top_k():
    probs = torch.softmax(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), -1)
    tok, exp, w = RF.top_k_assign(probs, 3)
    assert tok.numel() == 150
    ref = torch.topk(probs, 3).indices
    for t in range(50):
        assert sorted(exp[tok == t].tolist()) == sorted(ref[t].tolist())
    assert torch.equal(w, probs[tok, exp])


def test_top_k_assign_weights_are_differentiable():
    logits = torch.randn(10, 4, requires_grad=True)
    _, _, w = RF.top_k_assign(torch.softmax(logits, -1), 2, capacity=3)
    w.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_top_k_assign_keep_mask_takes_no_place():
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    keep = torch.tensor([[True, False], [True, True], [True, True]])
    tok, exp, _ = RF.top_k_assign(probs, 2, capacity=2, keep=keep)
    # first choices: t0->0, t1->0, t2->1; second: t0 skipped, t1->1 (place 1), t2->0 (full: dropped)
    assert sorted(zip(tok.tolist(), exp.tolist())) == [(0, 0), (1, 0), (1, 1), (2, 1)]


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=5), dict(capacity=0)])
def test_top_k_assign_rejects_bad_arguments(bad):
    args = dict(k=2, capacity=None) | bad
    with pytest.raises(ValueError, match="k must be|capacity must be"):
        RF.top_k_assign(torch.rand(4, 4), args["k"], args["capacity"])


def test_top_k_assign_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"shape \(tokens, experts\)"):
        RF.top_k_assign(torch.rand(2, 4, 4), 1)


# -- capacity ---------------------------------------------------------------------------------

def test_expert_capacity_matches_vmoe_table(vmoe_reference):
    d = vmoe_reference
    for i in range(len(d["capacity/result"])):
        multiple = None if d["capacity/multiple_of_is_none"][i] else int(d["capacity/multiple_of"][i])
        ours = RF.expert_capacity(int(d["capacity/num_tokens"][i]), int(d["capacity/num_experts"][i]), 1,
                                  float(d["capacity/capacity_factor"][i]), multiple_of=multiple,
                                  rounding=str(d["capacity/ceil_or_round"][i]))
        assert ours == int(d["capacity/result"][i]), i
    for i in range(len(d["capacity_raises/num_tokens"])):
        with pytest.raises(ValueError, match="capacity"):
            RF.expert_capacity(int(d["capacity_raises/num_tokens"][i]), int(d["capacity_raises/num_experts"][i]), 1,
                               float(d["capacity_raises/capacity_factor"][i]),
                               rounding=str(d["capacity_raises/ceil_or_round"][i]))


def test_expert_capacity_paper_example():
    # google-research/vmoe vmoe/moe.py compute_capacity(num_tokens=group_size * k, ...) with the paper
    # configs' groups (vmoe/configs/vmoe_paper/common.py: 8 images x 50 tokens of S/32 at 224 px = 400)
    # and C = 1.05: ceil(400 * 2 * 1.05 / 8) = 105, rounded up to a multiple of 4 -> 108.
    assert RF.expert_capacity(400, 8, 2, 1.05, multiple_of=4) == 108


# -- expert choice ----------------------------------------------------------------------------

def test_expert_choice_every_expert_takes_exactly_capacity_tokens():
    probs = torch.softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(1)), -1)
    tok, exp, w = RF.expert_choice_assign(probs, capacity=7)
    assert torch.equal(torch.bincount(exp, minlength=5), torch.full((5,), 7))
    for e in range(5):
        chosen = set(tok[exp == e].tolist())
        assert chosen == set(torch.topk(probs[:, e], 7).indices.tolist())
    assert torch.equal(w, probs[tok, exp])


def test_expert_choice_hand_worked():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    tok, exp, w = RF.expert_choice_assign(probs, capacity=2)
    assert list(zip(tok.tolist(), exp.tolist())) == [(0, 0), (1, 0), (2, 1), (1, 1)]
    with pytest.raises(ValueError, match="capacity must be in"):
        RF.expert_choice_assign(probs, capacity=4)


# -- Sinkhorn and balanced assignment ---------------------------------------------------------

def test_sinkhorn_marginals_converge():
    logits = 3 * torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    plan = RF.sinkhorn(logits, num_iters=500, tol=1e-9)
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8), atol=1e-6)
    assert torch.allclose(plan.sum(1), torch.full((64,), 1 / 64), atol=1e-5)
    # Sinkhorn only rescales rows and columns: the plan is diag(u) exp(logits) diag(v).
    ratio = plan / logits.exp()
    rank1 = ratio[:, :1] @ ratio[:1, :] / ratio[0, 0]
    assert torch.allclose(ratio, rank1, rtol=1e-4)


@pytest.mark.parametrize("seed", range(12))
def test_balanced_assignment_is_balanced_and_optimal(seed):
    """Against exhaustive search over every assignment that respects the capacity."""
    g = torch.Generator().manual_seed(seed)
    tokens, experts = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    scores = torch.randn(tokens, experts, generator=g, dtype=torch.float64)
    assignment = RF.balanced_assignment(scores)
    capacity = math.ceil(tokens / experts)
    assert (torch.bincount(assignment, minlength=experts) <= capacity).all()
    best = max(
        sum(scores[t, e].item() for t, e in enumerate(choice))
        for choice in itertools.product(range(experts), repeat=tokens)
        if max(choice.count(e) for e in range(experts)) <= capacity
    )
    assert scores[torch.arange(tokens), assignment].sum().item() == pytest.approx(best, abs=1e-9)


def test_balanced_assignment_respects_an_explicit_capacity_and_rejects_nan():
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0]])
    assert RF.balanced_assignment(scores, capacity=2).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        RF.balanced_assignment(scores, capacity=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        RF.balanced_assignment(torch.tensor([[float("nan"), 0.0]]))


# -- Soft MoE ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [f"case{i:02d}" for i in range(7)])
def test_soft_moe_weights_match_vmoe(vmoe_reference, case):
    d = {k.split("/")[-1]: v for k, v in vmoe_reference.items() if k.startswith(f"soft/{case}/")}
    dispatch, combine = RF.soft_moe_weights(torch.from_numpy(d["x"]), torch.from_numpy(d["mu"]),
                                            torch.tensor(float(d["scale"])))
    assert torch.allclose(dispatch, torch.from_numpy(d["dispatch_weights"]), atol=2e-6)
    assert torch.allclose(combine, torch.from_numpy(d["combine_weights"]), atol=2e-6)


def test_soft_moe_weights_normalisation():
    x, mu = torch.randn(2, 5, 4), torch.randn(4, 3, 2)
    dispatch, combine = RF.soft_moe_weights(x, mu, torch.tensor(1.0))
    assert torch.allclose(dispatch.sum(1), torch.ones(2, 3, 2))
    assert torch.allclose(combine.sum((2, 3)), torch.ones(2, 5))
