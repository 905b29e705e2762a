"""DSelect-k (arXiv 2106.03760): the smooth step and the selector weights against values worked by
hand, a naive loop over the paper's formula and the official TensorFlow gate's outputs (fixture:
tests/data/make_dselect_k_reference.py), its regularisers, its router in an MoE layer, and exact
k-sparsity (every smooth step exactly 0 or 1) after training on a toy multi-task problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MoE
from moezoo.routers import DSelectKRouter
from moezoo.routers import losses as L
from moezoo.routers.dselect_k import binary_codes, dselect_k_weights, smooth_step


def test_smooth_step_hand_worked():
    t = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    # gamma = 1, t = 0.25: -2 (1/64) + (3/2)(1/4) + 1/2 = 0.84375; odd about (0, 1/2).
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t, 1.0), expected)
    # gamma = 2 stretches it: S_2(t) = S_1(t / 2).
    torch.testing.assert_close(smooth_step(2 * t, 2.0), expected)
    # Zero gradient outside the cubic region, continuous at its ends (-6 t^2 / gamma^3 + 3 / (2 gamma) = 0).
    t = torch.tensor([-0.7, -0.5, 0.1, 0.5, 0.7], requires_grad=True)
    smooth_step(t, 1.0).sum().backward()
    torch.testing.assert_close(t.grad, torch.tensor([0.0, 0.0, 1.5 - 6 * 0.01, 0.0, 0.0]))


def test_binary_codes_most_significant_bit_first():
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert binary_codes(2).int().tolist() == [[0], [1]]


def _naive_weights(z, w, num_experts, gamma):
    """alpha_l = sum_i softmax(w)_i prod_j (S(z_ij) if bit j of l else 1 - S(z_ij)), as Python loops."""
    bits = len(z[0])

    def s(t):
        if t <= -gamma / 2:
            return 0.0
        if t >= gamma / 2:
            return 1.0
        return -2 / gamma ** 3 * t ** 3 + 3 / (2 * gamma) * t + 0.5

    weights = [math.exp(v) / sum(math.exp(u) for u in w) for v in w]
    alpha = []
    for expert in range(num_experts):
        code = format(expert, f"0{bits}b")
        total = 0.0
        for i, row in enumerate(z):
            r = 1.0
            for j, bit in enumerate(code):
                r *= s(row[j]) if bit == "1" else 1 - s(row[j])
            total += weights[i] * r
        alpha.append(total)
    return alpha


@pytest.mark.parametrize("num_experts, gamma", [(8, 1.0), (5, 1.0), (6, 0.5)])
def test_router_weights_match_a_naive_loop(num_experts, gamma):
    torch.manual_seed(0)
    router = DSelectKRouter(4, num_experts, k=3, gamma=gamma)
    with torch.no_grad():  # spread z over the cubic region and beyond
        router.z_logits.weight.normal_(0.0, 0.6)
        router.w_logits.weight.normal_(0.0, 1.0)
    x = torch.randn(7, 4)
    routing = router(x)
    z, w = router.selector_logits(x)
    expected = torch.tensor([_naive_weights(z[t].tolist(), w[t].tolist(), num_experts, gamma) for t in range(7)])
    torch.testing.assert_close(routing.dense_weights(), expected)
    assert bool((routing.weight > 0).all())  # exactly the non-zero pairs are assigned
    assert routing.num_assignments == int((expected > 0).sum())
    # Every token's weights sum to 1 when all codes are experts.
    if num_experts == 8:
        torch.testing.assert_close(routing.dense_weights().sum(-1), torch.ones(7))
    assert ("unreachable" in routing.losses) == (num_experts != 8)


OFFICIAL = np.load(Path(__file__).parent.parent / "data" / "dselect_k_reference.npz")
OFFICIAL_META = json.loads(str(OFFICIAL["meta"]))


@pytest.mark.parametrize("name", sorted(n for n in OFFICIAL_META if not n.startswith("_")))
def test_router_matches_the_official_gate(name):
    """Weights, selector outputs, gradients and both regularisers of the official ``DSelectKGate``
    (the official sums its regularisers over the examples; ours are means over the tokens)."""
    meta = OFFICIAL_META[name]
    ref = {key.split("/", 1)[1]: torch.from_numpy(np.asarray(OFFICIAL[key])) for key in OFFICIAL.files
           if key.startswith(name + "/")}
    example = meta["example_conditioned"]
    router = DSelectKRouter(meta["dim"], meta["experts"], meta["k"], gamma=meta["gamma"], per_token=example)
    with torch.no_grad():
        if example:
            router.z_logits.weight.copy_(ref["z_kernel"].t())
            router.z_logits.bias.copy_(ref["z_bias"])
            router.w_logits.weight.copy_(ref["w_kernel"].t())
            router.w_logits.bias.copy_(ref["w_bias"])
        else:
            router.z_logits.copy_(ref["z"][:, 0])
            router.w_logits.copy_(ref["w"][:, 0])
    x = (ref["x"] if example else torch.zeros(1, meta["dim"])).clone().requires_grad_(example)
    routing = router(x)
    weights = routing.dense_weights()
    torch.testing.assert_close(weights, ref["weights"].reshape(weights.shape), atol=1e-6, rtol=1e-5)
    selectors = dselect_k_weights(*router.selector_logits(x), router.codes, router.gamma)[1]
    torch.testing.assert_close(selectors, ref["selectors"].reshape(selectors.shape), atol=1e-6, rtol=1e-5)
    tokens = x.shape[0]
    torch.testing.assert_close(routing.losses["selector_entropy"] * tokens, ref["entropy"], atol=1e-5, rtol=1e-5)
    if meta["experts"] & (meta["experts"] - 1):
        torch.testing.assert_close(routing.losses["unreachable"] * tokens, ref["unreachable"], atol=1e-5, rtol=1e-5)
    else:
        assert "unreachable" not in routing.losses
    (weights * ref["g"]).sum().backward()
    if example:
        torch.testing.assert_close(x.grad, ref["x_grad"], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(router.z_logits.grad, ref["z_grad"][:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(router.w_logits.grad, ref["w_grad"][:, 0], atol=1e-5, rtol=1e-5)


def test_entropy_and_unreachable_losses_hand_worked():
    # One selector at r = [1/2, 1/2]: -(2 * 1/2 * log(1/2 + 1e-6)); one-hot selectors give ~0.
    r = torch.tensor([[[0.5, 0.5]]])
    assert L.selector_entropy_loss(r).item() == pytest.approx(-math.log(0.5 + 1e-6), rel=1e-6)
    assert abs(L.selector_entropy_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item()) < 1e-5
    # Three experts on two bits, z = 0: every smooth step is 1/2, r = [1/4, 1/4, 1/4] (the 4th code is
    # unreachable): entropy 3 * (1/4) log 4 per selector; unreachable 1 / (3/4) per selector.
    router = DSelectKRouter(2, 3, k=2, per_token=False)
    with torch.no_grad():
        router.z_logits.zero_()
    routing = router(torch.randn(5, 2))
    assert routing.losses["selector_entropy"].item() == pytest.approx(2 * 0.75 * -math.log(0.25 + 1e-6), rel=1e-5)
    assert routing.losses["unreachable"].item() == pytest.approx(2 / 0.75, rel=1e-6)


def test_in_an_moe_layer_equals_the_dense_mixture():
    torch.manual_seed(1)
    layer = MoE(6, 10, 4, router=DSelectKRouter(6, 4, k=2), activation="relu", backend="torch")
    x = torch.randn(2, 5, 6)
    out = layer(x)
    flat = x.reshape(-1, 6)
    alpha = dselect_k_weights(*layer.router.selector_logits(flat), layer.router.codes)[0]
    e = layer.experts
    per_expert = torch.stack([F.relu(flat @ e.w_in[i] + e.b_in[i]) @ e.w_out[i] + e.b_out[i] for i in range(4)], 1)
    torch.testing.assert_close(out.reshape(-1, 6), (alpha.unsqueeze(-1) * per_expert).sum(1), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert layer.router.z_logits.weight.grad.abs().sum() > 0  # the smooth gate is trained through the experts


def test_bad_configuration_names_the_field():
    with pytest.raises(ValueError, match="gamma"):
        DSelectKRouter(4, 4, k=2, gamma=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        DSelectKRouter(4, 1, k=1)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        DSelectKRouter(4, 4, k=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_k_sparsity_at_convergence_on_a_toy_multi_task_problem(seed):
    """Three regression tasks y_t = x . v_t share 8 linear experts; each task has its own task-only
    DSelect-k gate (k = 2) and the entropy regulariser (coefficient 0.1). After 300 Adam steps every
    smooth step is exactly 0 or 1 (each selector one-hot), each task uses at most k experts, and
    every task is fitted."""
    torch.manual_seed(seed)
    dim, experts, k, tasks = 6, 8, 2, 3
    targets = torch.randn(tasks, dim)
    bank = torch.nn.Linear(dim, experts, bias=False)
    gates = torch.nn.ModuleList([DSelectKRouter(dim, experts, k, per_token=False) for _ in range(tasks)])
    optimizer = torch.optim.Adam([*gates.parameters(), *bank.parameters()], lr=0.05)
    for _ in range(300):
        x = torch.randn(64, dim)
        f = bank(x)
        loss = 0.0
        for t in range(tasks):
            routing = gates[t](x)
            prediction = (routing.dense_weights() * f).sum(-1)
            loss = loss + (prediction - x @ targets[t]).pow(2).mean() + 0.1 * routing.losses["selector_entropy"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    x = torch.randn(256, dim)
    f = bank(x)
    for t, gate in enumerate(gates):
        steps = smooth_step(gate.z_logits.detach(), gate.gamma)
        assert bool(((steps == 0) | (steps == 1)).all()), f"task {t}: smooth steps {steps.tolist()}"
        routing = gate(x)
        assert routing.num_assignments <= k * x.shape[0]
        selector = dselect_k_weights(*gate.selector_logits(x[:1]), gate.codes, gate.gamma)[1][0]
        assert sorted(selector.reshape(-1).tolist()) == [0.0] * (k * experts - k) + [1.0] * k
        y = x @ targets[t]
        assert ((routing.dense_weights() * f).sum(-1) - y).pow(2).mean() < 1e-3 * y.var()
