"""Forced-balance routing: the hand-worked round-robin assignment and its exactly equal loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MoE
from moezoo.routers import ForcedBalanceRouter


def test_assignment_and_equal_loads_hand_worked():
    # 6 tokens, E=4, k=2: token t takes experts 2t mod 4 and 2t+1 mod 4 -> 0,1 / 2,3 / 0,1 / ...
    routing = ForcedBalanceRouter(3, 4, k=2)(torch.randn(6, 3))
    assert routing.token.tolist() == [0, 1, 2, 3, 4, 5] * 2
    assert routing.expert.tolist() == [0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3]
    assert torch.equal(routing.weight, torch.full((12,), 0.5))
    assert routing.tokens_per_expert().tolist() == [3, 3, 3, 3]
    assert routing.stats["dropped_fraction"] == 0 and routing.logits is None and routing.losses == {}


def test_loads_differ_by_at_most_one_when_not_divisible():
    # 5 tokens, E=3, k=2: assignment indices 0..9 mod 3 -> expert 0 four times, 1 and 2 three times.
    routing = ForcedBalanceRouter(3, 3, k=2)(torch.randn(5, 3))
    assert routing.tokens_per_expert().tolist() == [4, 3, 3]
    per_token = routing.dense_weights()
    assert torch.equal((per_token > 0).sum(dim=1), torch.full((5,), 2))  # two distinct experts each


def test_layer_output_is_the_mean_of_the_assigned_experts():
    torch.manual_seed(0)
    layer = MoE(6, 8, 3, ForcedBalanceRouter(6, 3, k=2), activation="relu", bias=False, backend="torch")
    x = torch.randn(4, 6)
    e = layer.experts
    expected = torch.stack([
        sum(0.5 * F.relu(x[t] @ e.w_in[j]) @ e.w_out[j] for j in ((2 * t) % 3, (2 * t + 1) % 3)) for t in range(4)
    ])
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="k must be <= num_experts=2, got k=3"):
        ForcedBalanceRouter(4, 2, k=3)
    with pytest.raises(ValueError, match="capacity_groups"):
        ForcedBalanceRouter(4, 2, k=1)(torch.randn(3, 4), capacity_groups=[1, 2])
