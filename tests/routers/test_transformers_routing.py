"""The routing math moezoo takes from transformers' MoE models, against transformers' own functions:
group-limited selection (DeepSeek-V2/V3), SparseMixer (PhiMoE) in both modes with its custom backward,
and the balancing loss pooled over layers (load_balancing_loss_func)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from moezoo import routers as R
from moezoo.routers import functional as RF
from moezoo.routers import losses as L


def test_group_limited_mask_keeps_the_best_groups_by_their_top_scores():
    scores = torch.rand(50, 12, generator=torch.Generator().manual_seed(0))
    for group_top in (1, 2):
        mask = RF.group_limited_mask(scores, num_groups=4, topk_group=2, group_top=group_top)
        for t in range(50):  # a plain loop over groups: sum of the group_top best, two best groups kept
            group_score = [sorted(scores[t, 3 * g: 3 * g + 3].tolist(), reverse=True)[:group_top] for g in range(4)]
            best = sorted(range(4), key=lambda g: -sum(group_score[g]))[:2]
            expected = [e // 3 in best for e in range(12)]
            assert mask[t].tolist() == expected


def test_group_limited_router_chooses_within_the_groups_and_weights_by_unbiased_scores():
    torch.manual_seed(0)
    router = R.GroupLimitedRouter(8, 8, k=3, num_groups=4, topk_group=2, normalize=True, normalize_eps=1e-20, scale=2.5)
    router.bias.copy_(torch.randn(8))
    x = torch.randn(40, 8)
    routing = router(x)
    scores = torch.sigmoid(router.compute_logits(x))
    allowed = RF.group_limited_mask(scores + router.bias, 4, 2)
    assert allowed[routing.token, routing.expert].all()
    chosen = torch.zeros(40, 8, dtype=torch.bool)
    chosen[routing.token, routing.expert] = True
    select = (scores + router.bias).masked_fill(~allowed, float("-inf"))
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, select.topk(3).indices, True))
    dense = routing.dense_weights()
    expected = torch.where(chosen, scores, 0.0)
    torch.testing.assert_close(dense, 2.5 * expected / expected.sum(1, keepdim=True))


@pytest.mark.parametrize("training", [False, True])
def test_sparse_mixer_equals_transformers_phimoe_sparsemixer(training):
    logits = (torch.randn(64, 6, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
    theirs_logits = logits.detach().clone().requires_grad_()
    cotangent = torch.randn(64, 2)
    torch.manual_seed(3)
    weight, index = RF.sparse_mixer(logits, 0.3, training)
    torch.manual_seed(3)
    their_weight, their_index = sparsemixer(theirs_logits, jitter_eps=0.3, training=training)
    assert torch.equal(index, their_index)
    torch.testing.assert_close(weight, their_weight, atol=0, rtol=0)
    (weight * cotangent).sum().backward()
    (their_weight * cotangent).sum().backward()
    torch.testing.assert_close(logits.grad, theirs_logits.grad, atol=0, rtol=0)
    assert (index[:, 0] != index[:, 1]).all()
    if not training:  # evaluation: the two best logits, in order
        assert torch.equal(index, logits.detach().topk(2).indices)


def test_sparse_mixer_router_routes_two_experts_per_token_choice_major():
    router = R.SparseMixerRouter(8, 4, jitter_eps=0.3).eval()
    x = torch.randn(10, 8)
    routing = router(x)
    weight, index = RF.sparse_mixer(router.compute_logits(x), 0.3, False)
    assert torch.equal(routing.token, torch.arange(10).repeat(2))
    assert torch.equal(routing.expert, index.t().reshape(-1))
    assert torch.equal(routing.weight, weight.t().reshape(-1))


@pytest.mark.parametrize("masked", [False, True])
def test_pooled_load_balancing_loss_is_transformers_load_balancing_loss_func(masked):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 6, generator=g) * 2 for _ in range(3))
    mask = (torch.rand(2, 7, generator=g) > 0.3).long() if masked else None
    expected = load_balancing_loss_func(logits, 6, top_k=2, attention_mask=mask)
    actual = L.pooled_load_balancing_loss(list(logits), 2, mask=None if mask is None else mask.reshape(-1))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_pooled_loss_relates_to_the_per_layer_switch_loss():
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, -1)
    per_layer = L.load_balancing_loss(probs, probs.topk(3).indices)
    # one layer: k times moezoo's per-layer loss (whose counts are normalised to sum 1, not k)
    torch.testing.assert_close(L.pooled_load_balancing_loss([logits], 3), 3 * per_layer)
    other = torch.randn(30, 5, generator=torch.Generator().manual_seed(3))
    both = L.pooled_load_balancing_loss([logits, other], 3)
    other_probs = torch.softmax(other, -1)
    mean_of_layers = 3 * (per_layer + L.load_balancing_loss(other_probs, other_probs.topk(3).indices)) / 2
    assert not torch.allclose(both, mean_of_layers)  # several layers: pooled, not a mean of per-layer losses
