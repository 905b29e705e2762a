"""The MoE layer: dense equivalence, shared experts, aux losses and stats, balancing in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moezoo.layers import MLP, MoE, aux_loss, register_router_updates, routed_layers, routing_stats
from moezoo.routers import BatchPrioritizedRouter, HashRouter, SigmoidRouter, TopKRouter


@pytest.mark.parametrize("gated, activation", [(False, "gelu"), (True, "silu")])
def test_one_expert_k1_equals_dense_mlp(gated, activation):
    torch.manual_seed(0)
    dense = MLP(12, 20, activation, gated=gated)
    moe = MoE(12, 20, 1, TopKRouter(12, 1, k=1), activation=activation, gated=gated)
    moe.experts.load_dense(dense.fc1, dense.fc2)
    x = torch.randn(3, 7, 12)
    # With one expert the softmax weight is exactly 1.
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_upcycled_experts_equal_dense_when_weights_sum_to_one():
    torch.manual_seed(1)
    dense = MLP(8, 16)
    moe = MoE(8, 16, 4, TopKRouter(8, 4, k=2, normalize=True))
    moe.experts.load_dense(dense.fc1, dense.fc2)
    x = torch.randn(10, 8)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_shared_expert_with_sigmoid_gate():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, TopKRouter(8, 4, k=2), shared_experts=1, shared_gate=True, gated=True, activation="silu")
    x = torch.randn(5, 8)
    routed_only = MoE(8, 16, 4, TopKRouter(8, 4, k=2), gated=True, activation="silu")
    routed_only.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    expected = routed_only(x) + torch.sigmoid(moe.shared_gate(x)) * moe.shared(x)
    assert torch.allclose(moe(x), expected, atol=1e-6)


def test_router_factory_and_validation():
    moe = MoE(8, 16, 4, lambda d, e: SigmoidRouter(d, e, k=1))
    assert isinstance(moe.router, SigmoidRouter) and moe.router.num_experts == 4
    with pytest.raises(ValueError, match="router is for"):
        MoE(8, 16, 4, TopKRouter(8, 6))
    with pytest.raises(ValueError, match="dim=8"):
        MoE(6, 16, 4, TopKRouter(8, 4))(torch.randn(3, 6))
    with pytest.raises(ValueError, match="hidden must be"):
        MoE(8, 0, 4)
    with pytest.raises(ValueError, match="shape"):
        MoE(8, 16, 4)(torch.randn(3, 7))


def test_identical_init():
    moe = MoE(6, 10, 3, identical_init=True)
    assert torch.equal(moe.experts.w_in[0], moe.experts.w_in[2]) and torch.equal(moe.experts.b_out[1], moe.experts.b_out[0])
    assert not torch.equal(MoE(6, 10, 3).experts.w_in[0], MoE(6, 10, 3).experts.w_in[1])


def test_hash_router_gets_token_ids_and_positions():
    moe = MoE(4, 8, 4, HashRouter(4, 4))
    ids = torch.randint(0, 100, (2, 5))
    out = moe(torch.randn(2, 5, 4), token_ids=ids)
    assert out.shape == (2, 5, 4)
    pos = MoE(4, 8, 4, HashRouter(4, 4, key="position"))
    pos(torch.randn(2, 5, 4))
    assert pos.last_stats["tokens_per_expert"].sum() == 10


def test_aux_loss_sums_weighted_losses_over_layers():
    torch.manual_seed(3)
    model = nn.Sequential(
        MoE(8, 16, 4, TopKRouter(8, 4), aux_loss_weights={"load_balancing": 0.5}),
        MoE(8, 16, 4, TopKRouter(8, 4), aux_loss_weights={"z_loss": 0.1}),
    )
    model(torch.randn(20, 8))
    a, b = model[0].last_losses, model[1].last_losses
    assert torch.allclose(aux_loss(model), 0.5 * a["load_balancing"] + 0.1 * b["z_loss"])
    assert torch.allclose(aux_loss(model, {"z_loss": 1.0}), a["z_loss"] + b["z_loss"])
    assert aux_loss(nn.Linear(2, 2)).item() == 0.0
    stats = routing_stats(model)
    assert set(stats) == {"0", "1"} and stats["0"]["tokens_per_expert"].sum() == 40
    assert len(routed_layers(model)) == 2


def test_empty_batch_returns_empty():
    moe = MoE(8, 16, 4)
    out = moe(torch.randn(0, 5, 8))
    assert out.shape == (0, 5, 8)


def test_moe_in_timm_block_position():
    moe = MoE(8, 16, 4, BatchPrioritizedRouter(8, 4, group_size=10))
    out = moe(torch.randn(4, 5, 8))
    assert out.shape == (4, 5, 8)


def _train_share_of_busiest_expert(router, weights, steps=200, seed=0):
    """Train a MoE to imitate a random MLP on inputs whose constant feature favours expert 0."""
    torch.manual_seed(seed)
    dim = 16
    moe = MoE(dim, 32, 8, router, aux_loss_weights=weights)
    with torch.no_grad():
        moe.router.gate.weight[:, 0] = 0.0
        moe.router.gate.weight[0, 0] = 2.0
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, dim))
    opt = torch.optim.Adam(moe.parameters(), 1e-2)
    register_router_updates(opt, moe)
    shares = []
    for _ in range(steps):
        x = torch.randn(256, dim)
        x[:, 0] = 1.0
        loss = (moe(x) - teacher(x).detach()).pow(2).mean() + aux_loss(moe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts = moe.last_stats["tokens_per_expert"]
        shares.append((counts.max() / counts.sum()).item())
    return sum(shares[-20:]) / 20


def test_balancing_keeps_load_near_uniform_and_its_absence_skews_it():
    uniform = 1 / 8
    skewed = _train_share_of_busiest_expert(TopKRouter(16, 8, k=1), {})
    with_loss = _train_share_of_busiest_expert(TopKRouter(16, 8, k=1), {"load_balancing": 0.1})
    loss_free = _train_share_of_busiest_expert(SigmoidRouter(16, 8, k=1, bias_update_rate=0.003), {})
    no_bias = _train_share_of_busiest_expert(SigmoidRouter(16, 8, k=1), {})
    assert skewed > 0.9 and no_bias > 0.9
    assert with_loss < 2 * uniform
    assert loss_free < 2 * uniform


def test_router_input_replaces_x_for_routing():
    torch.manual_seed(4)
    moe = MoE(6, 12, 4, TopKRouter(10, 4, k=1))
    x, context = torch.randn(2, 5, 6), torch.randn(2, 5, 10)
    out = moe(x, router_input=context)
    routing = moe.router.eval()(context.reshape(-1, 10))
    moe.eval()
    assert torch.allclose(moe(x, router_input=context), moe.experts(x.reshape(-1, 6), routing).view(2, 5, 6))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="router_input must have shape"):
        moe(x, router_input=torch.randn(2, 4, 10))
