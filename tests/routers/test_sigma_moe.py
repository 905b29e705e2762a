"""σ-MoE: the sigmoid selector, expert dropout, the entropy regulariser and the MoE configuration,
against the reference's formulas (RobertCsordas/moe ``layers/moe_layer.py``) with explicit loops."""

from __future__ import annotations

import math

import torch

from moezoo.layers import MoE, aux_loss
from moezoo.modalities.text.model import sigma_moe
from moezoo.routers.losses import marginal_entropy_loss
from moezoo.routers.sigma_moe import SigmaMoERouter, renorm_keep_std_


def test_selection_is_top_k_sigmoid_without_renormalisation():
    torch.manual_seed(0)
    router = SigmaMoERouter(6, num_experts=5, k=2).eval()
    x = torch.randn(7, 6)
    routing = router(x)
    scores = torch.sigmoid(x @ router.gate.weight.t())
    for t in range(7):
        chosen = routing.expert[routing.token == t].tolist()
        assert sorted(chosen) == sorted(torch.topk(scores[t], 2).indices.tolist())
    torch.testing.assert_close(routing.weight, scores[routing.token, routing.expert])
    assert routing.num_assignments == 14


def test_expert_dropout_zeroes_scores_before_the_top_k():
    torch.manual_seed(1)
    router = SigmaMoERouter(6, num_experts=4, k=2, expert_dropout=0.6).train()
    x = torch.randn(50, 6)
    torch.manual_seed(2)
    routing = router(x)
    torch.manual_seed(2)
    dropped = torch.rand(50, 4) < 0.6
    scores = torch.sigmoid(x @ router.gate.weight.t()).masked_fill(dropped, 0.0)
    short = 0
    for t in range(50):
        mine = routing.expert[routing.token == t]
        weights = routing.weight[routing.token == t]
        expected = torch.topk(scores[t], 2).values
        torch.testing.assert_close(weights.sort().values, expected.sort().values)
        survivors = set((~dropped[t]).nonzero().flatten().tolist())
        if len(survivors) >= 2:  # enough survivors: no dropped expert is taken
            assert not dropped[t, mine].any()
        else:  # fewer than k survive: all of them are taken, the other places go to dropped experts, weight 0
            short += 1
            assert survivors <= set(mine.tolist()) and len(mine) == 2
            assert (weights[dropped[t, mine]] == 0).all() and dropped[t, mine].sum() == 2 - len(survivors)
    # Both branches ran: with 4 experts each dropped with p = 0.6, P(fewer than 2 survive) = 0.475.
    assert 0 < short < 50


def test_marginal_entropy_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(marginal_entropy_loss(logits), (p * p.log()).sum())
    uniform = marginal_entropy_loss(torch.zeros(4, 5))
    torch.testing.assert_close(uniform, torch.tensor(-math.log(5)))  # the minimum: -log E
    per_group = marginal_entropy_loss(torch.stack([logits, torch.zeros(2, 3)]))
    torch.testing.assert_close(per_group, ((p * p.log()).sum() - math.log(3)) / 2)


def test_selector_init_renormalised_rows_keep_the_std():
    torch.manual_seed(3)
    router = SigmaMoERouter(256, num_experts=16, k=4)
    w = router.gate.weight
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, norms[0].item()), rtol=1e-5, atol=1e-6)
    assert abs(w.std().item() - 256 ** -0.5) < 0.1 * 256 ** -0.5
    t = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    std = t.std()
    renorm_keep_std_(t)
    torch.testing.assert_close(t, torch.tensor([[0.6, 0.8], [0.0, 1.0]]) * std / torch.tensor([0.6, 0.8, 0.0, 1.0]).std())


def test_sigma_moe_layer_equals_the_reference_formula():
    torch.manual_seed(4)
    layer = sigma_moe(8, expert_size=6, num_experts=4, k=2, entropy_weight=1e-3).eval()
    assert isinstance(layer, MoE) and layer.experts.b_in is None and layer.experts.activation == "relu"
    x = torch.randn(2, 5, 8)
    out = layer(x)
    w_sel, keys, values = layer.router.gate.weight, layer.experts.w_in, layer.experts.w_out
    expected = torch.zeros(10, 8)
    for t, row in enumerate(x.reshape(10, 8)):
        s = torch.sigmoid(row @ w_sel.t())
        for e in torch.topk(s, 2).indices.tolist():
            expected[t] += s[e] * (torch.relu(row @ keys[e]) @ values[e])
    torch.testing.assert_close(out.reshape(10, 8), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux_loss(layer), 1e-3 * marginal_entropy_loss(x.reshape(10, 8) @ w_sel.t()))


def test_sigma_moe_init_scales():
    torch.manual_seed(5)
    layer = sigma_moe(256, expert_size=128, num_experts=16, k=4)
    assert abs(layer.experts.w_in.std().item() - 256 ** -0.5) < 0.02 * 256 ** -0.5
    assert abs(layer.experts.w_out.std().item() - (16 * 128) ** -0.5) < 0.02 * (16 * 128) ** -0.5
