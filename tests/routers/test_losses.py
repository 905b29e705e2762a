"""Auxiliary losses against V-MoE's reference outputs and direct computations of each formula."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.routers import losses as L


def _case(data, prefix):
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


@pytest.mark.parametrize("i", range(6))
def test_importance_loss_matches_vmoe(vmoe_reference, i):
    d = _case(vmoe_reference, f"loss/importance/case{i:02d}/")
    ours = L.importance_loss(torch.from_numpy(d["gates"]))
    assert ours.item() == pytest.approx(float(d["loss_mean"]), rel=1e-5)


@pytest.mark.parametrize("i", range(6))
def test_gshard_loss_is_load_balancing_on_top1(vmoe_reference, i):
    d = _case(vmoe_reference, f"loss/gshard/case{i:02d}/")
    gates = torch.from_numpy(d["gates"])  # (G, S, E)
    per_group = [L.load_balancing_loss(g, g.argmax(-1)) for g in gates]
    assert torch.stack(per_group).mean().item() == pytest.approx(float(d["loss_mean"]), rel=1e-5)


@pytest.mark.parametrize("i", range(6))
def test_load_loss_matches_vmoe(vmoe_reference, i):
    d = _case(vmoe_reference, f"loss/load/case{i:02d}/")
    ours = L.load_loss(torch.from_numpy(d["logits"]), torch.from_numpy(d["logits_noisy"]), float(d["noise_std"]), int(d["k"]))
    assert ours.item() == pytest.approx(float(d["loss_mean"]), rel=1e-5)


def test_golden_values_from_vmoe_tests():
    gates = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]])
    assert L.importance_loss(gates).item() == pytest.approx(0.03874999, rel=1e-6)
    assert L.load_balancing_loss(gates, gates.argmax(-1)).item() == pytest.approx(1.0875, rel=1e-6)
    logits = torch.tensor([[0.9, 0.06, 0.04], [0.7, 0.18, 0.12], [0.85, 0.05, 0.1]])
    noise = torch.tensor([[-0.037, 0.026, -0.018], [-0.074, 0.045, -0.015], [-0.067, -0.059, 0.073]])
    assert L.load_loss(logits, logits + noise, 0.1, 2).item() == pytest.approx(0.48573864536489236, rel=1e-5)


def test_importance_loss_direct_formula():
    probs = torch.softmax(torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(0)), -1)
    expected = 0.0
    for g in probs:
        imp = g.sum(0).double()
        mean = imp.mean()
        std = math.sqrt(((imp - mean) ** 2).mean())
        expected += (std / mean) ** 2 / 2
    assert L.importance_loss(probs).item() == pytest.approx(float(expected), rel=1e-5)


def test_load_balancing_is_one_at_uniform_router():
    probs = torch.full((12, 4), 0.25)
    index = torch.arange(12) % 4
    assert L.load_balancing_loss(probs, index).item() == pytest.approx(1.0)
    # top-2 assignments are counted per choice
    index2 = torch.stack([index, (index + 1) % 4], 1)
    assert L.load_balancing_loss(probs, index2).item() == pytest.approx(1.0)


def test_load_balancing_hand_worked():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    index = torch.tensor([0, 0, 1])
    # f = (2/3, 1/3), P = (0.5, 0.5): 2 * (2/3 * .5 + 1/3 * .5) = 1
    assert L.load_balancing_loss(probs, index).item() == pytest.approx(1.0)
    index = torch.tensor([0, 0, 0])
    # f = (1, 0): 2 * 0.5 = 1 ... P0 = 0.5 -> 1.0; use skewed probs too
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert L.load_balancing_loss(probs, index).item() == pytest.approx(2 * 0.8)


def test_z_loss_direct_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    assert L.z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="tokens, experts"):
        L.importance_loss(torch.rand(5))
    with pytest.raises(ValueError, match="k must be"):
        L.load_loss(torch.rand(4, 3), torch.rand(4, 3), 0.1, 4)
    with pytest.raises(ValueError, match="expert_index"):
        L.load_balancing_loss(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))


def test_local_entropy_direct_formula():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    expected = (math.log(2) + 0.0 + (2 * 0.25 * math.log(4) + 0.5 * math.log(2))) / 3
    assert L.local_entropy_loss(probs).item() == pytest.approx(expected, rel=1e-6)


def test_global_entropy_direct_formula_and_threshold():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    # mean distribution (0.5, 0.5, 0, 0): entropy log 2
    assert L.global_entropy_loss(probs).item() == pytest.approx(-math.log(2), rel=1e-6)
    assert L.global_entropy_loss(probs, threshold=math.log(4)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert L.global_entropy_loss(probs, threshold=math.log(2) - 0.1).item() == 0.0
    # confident tokens spread evenly: local entropy 0, global entropy maximal
    spread = torch.eye(4)
    assert L.local_entropy_loss(spread).item() == pytest.approx(0.0, abs=1e-6)
    assert L.global_entropy_loss(spread).item() == pytest.approx(-math.log(4), rel=1e-6)
