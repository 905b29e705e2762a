"""SpeechMoE's router and its two losses, against the formulas worked by hand and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.routers.losses import mean_importance_loss, sparsity_l1_loss
from moezoo.routers.speech_moe import SPEECHMOE_LOSS_WEIGHTS, SpeechMoERouter

# Three frames over n = 4 experts: one-hot, uniform, and an even split between two experts.
HAND = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])


def test_sparsity_l1_loss_by_hand():
    # ||p/||p||_2||_1 per frame: 1 (one-hot), 1 / 0.5 = 2 = sqrt(4) (uniform), 1 / sqrt(0.5) = sqrt(2).
    expected = (1.0 + 2.0 + math.sqrt(2.0)) / 3
    assert sparsity_l1_loss(HAND).item() == pytest.approx(expected, rel=1e-6)
    assert sparsity_l1_loss(HAND[:1]).item() == pytest.approx(1.0)  # the minimum: one-hot frames


def test_mean_importance_loss_by_hand():
    # Imp = mean over frames = [1.75, 0.75, 0.25, 0.25] / 3; L_m = 4 * sum Imp^2.
    imp = [1.75 / 3, 0.75 / 3, 0.25 / 3, 0.25 / 3]
    assert mean_importance_loss(HAND).item() == pytest.approx(4 * sum(v * v for v in imp), rel=1e-6)
    assert mean_importance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(1.0)  # balanced: minimum
    assert mean_importance_loss(HAND[:1].repeat(6, 1)).item() == pytest.approx(4.0)  # collapsed: n


def test_losses_against_naive_loops_over_leading_dims():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 7, 5), dim=-1)
    frames = probs.reshape(-1, 5).tolist()
    naive_l1 = sum(sum(abs(v) for v in p) / math.sqrt(sum(v * v for v in p)) for p in frames) / len(frames)
    mean = [sum(p[j] for p in frames) / len(frames) for j in range(5)]
    assert sparsity_l1_loss(probs).item() == pytest.approx(naive_l1, rel=1e-6)
    assert mean_importance_loss(probs).item() == pytest.approx(5 * sum(v * v for v in mean), rel=1e-6)


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="tokens, experts"):
        sparsity_l1_loss(torch.ones(4))
    with pytest.raises(ValueError, match="floating"):
        mean_importance_loss(torch.ones(3, 4, dtype=torch.long))


def test_router_top1_gate_value_and_losses_on_its_own_probabilities():
    torch.manual_seed(1)
    router = SpeechMoERouter(6, 4, embed_dim=3, global_dim=2)
    assert router.gate.in_features == 3 + 2 + 6 and router.gate.bias is None
    x, e, g = torch.randn(10, 6), torch.randn(10, 3), torch.randn(10, 2)
    route_on = SpeechMoERouter.router_input(x, e, g)
    assert torch.equal(route_on, torch.cat([e, g, x], dim=-1))
    routing = router(route_on)
    probs = torch.softmax(route_on @ router.gate.weight.t(), dim=-1)
    assert torch.equal(routing.token, torch.arange(10))  # top-1, no capacity: one assignment per frame
    assert torch.equal(routing.expert, probs.argmax(-1))
    assert torch.allclose(routing.weight, probs.max(-1).values)  # scaled by the gate value, not renormalised
    assert routing.losses["sparsity_l1"].item() == pytest.approx(sparsity_l1_loss(probs).item(), rel=1e-6)
    assert routing.losses["mean_importance"].item() == pytest.approx(mean_importance_loss(probs).item(), rel=1e-6)
    assert SPEECHMOE_LOSS_WEIGHTS == {"sparsity_l1": 0.1, "mean_importance": 0.1}


def test_router_init_and_validation():
    bound = 0.5 * math.sqrt(6.0 / (9 + 4))  # Xavier uniform, gain 0.5, fan_in 9, fan_out 4
    router = SpeechMoERouter(5, 4, embed_dim=4)
    assert router.gate.weight.abs().max().item() <= bound
    zero = SpeechMoERouter(5, 4, embed_dim=4, init_gain=0.0)
    assert zero.gate.weight.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="embed_dim"):
        SpeechMoERouter(5, 4, embed_dim=0)
    with pytest.raises(ValueError, match="k must be"):
        SpeechMoERouter(5, 4, embed_dim=2, k=5)
    with pytest.raises(ValueError, match="expected dim=9"):
        router(torch.randn(3, 5))  # the layer input alone, without the embedding
