"""Every router on hand-worked cases, against V-MoE's reference router, and on bad input."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from moezoo import routers as R
from moezoo.routers import functional as RF


def identity_router(cls, experts, **kwargs):
    """A router whose logits equal its input (gate = identity)."""
    router = cls(experts, experts, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(experts))
    return router


def pairs(routing):
    return sorted(zip(routing.token.tolist(), routing.expert.tolist()))


# -- TopKRouter -------------------------------------------------------------------------------

def test_top_k_softmax_then_top_k_weights_are_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    r = identity_router(R.TopKRouter, 3, k=2).eval()
    out = r(logits)
    probs = torch.softmax(logits, -1)
    assert pairs(out) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert torch.allclose(out.dense_weights(), probs * torch.tensor([[1, 1, 0], [0, 1, 1]]))


def test_top_k_mixtral_convention_equals_renormalised_softmax():
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    a = identity_router(R.TopKRouter, 6, k=2, order="topk_softmax").eval()(logits)
    b = identity_router(R.TopKRouter, 6, k=2, normalize=True).eval()(logits)
    assert pairs(a) == pairs(b)
    assert torch.allclose(a.dense_weights(), b.dense_weights(), atol=1e-6)
    assert torch.allclose(a.dense_weights().sum(1), torch.ones(30))


def test_top_k_capacity_drops_in_token_order_top1_first():
    # 4 tokens all prefer expert 0 then 1; E=2, k=2, C=0.5 -> capacity ceil(2*4*0.5/2)=2.
    logits = torch.tensor([[3.0, 1.0], [3.0, 1.0], [3.0, 1.0], [3.0, 1.0]])
    r = identity_router(R.TopKRouter, 2, k=2, capacity_factor=0.5).eval()
    out = r(logits)
    # first choices: t0, t1 take expert 0; t2, t3 dropped. second choices: t0, t1 take expert 1.
    assert pairs(out) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert out.stats["dropped_fraction"].item() == pytest.approx(0.5)
    assert out.stats["unrouted_fraction"].item() == pytest.approx(0.5)


def test_top_k_eval_capacity_differs_from_training():
    logits = torch.zeros(8, 2)
    r = identity_router(R.TopKRouter, 2, k=1, capacity_factor=0.5, eval_capacity_factor=2.0)
    # Ties go to expert 0. Training: ceil(8 * 0.5 / 2) = 2 places; evaluation: ceil(8 * 2 / 2) = 8.
    assert r.train()(logits).num_assignments == 2
    assert r.eval()(logits).num_assignments == 8


def test_top_k_jitter_and_noise_only_in_training():
    x = torch.randn(16, 4)
    r = R.TopKRouter(4, 4, k=1, jitter=0.1, noisy=True)
    with torch.no_grad():
        r.noise.weight.fill_(1.0)
    r.eval()
    assert pairs(r(x)) == pairs(r(x))
    assert "load" not in r(x).losses
    r.train()
    out = r(x)
    assert {"load", "importance", "load_balancing", "z_loss"} <= set(out.losses)


def test_top_k_jitter_multiplies_the_input_by_uniform_noise_in_training():
    x = torch.randn(16, 4)
    r = identity_router(R.TopKRouter, 4, k=4, jitter=0.5).train()
    torch.manual_seed(7)
    out = r(x)
    torch.manual_seed(7)
    jittered = x * torch.empty_like(x).uniform_(0.5, 1.5)  # Switch: x * U(1 - eps, 1 + eps)
    torch.testing.assert_close(out.dense_weights(), torch.softmax(jittered, -1))
    assert not torch.allclose(out.dense_weights(), torch.softmax(x, -1), atol=1e-3)
    torch.testing.assert_close(r.eval()(x).dense_weights(), torch.softmax(x, -1))


def test_top_k_noisy_gating_adds_learned_gaussian_noise_in_training():
    x = torch.randn(16, 4)
    r = identity_router(R.TopKRouter, 4, k=4, noisy=True).train()
    with torch.no_grad():
        r.noise.weight.copy_(torch.randn(4, 4))
    torch.manual_seed(3)
    out = r(x)
    torch.manual_seed(3)
    # Shazeer et al. 2017: H(x) = x W_g + N(0, 1) * softplus(x W_noise) (+ 1e-2 for stability).
    noisy = x + torch.randn(16, 4) * (F.softplus(x @ r.noise.weight.t()) + 1e-2)
    torch.testing.assert_close(out.dense_weights(), torch.softmax(noisy, -1))
    assert not torch.allclose(out.dense_weights(), torch.softmax(x, -1), atol=1e-3)


def test_top_k_gshard_random_second_keeps_with_probability_2w2():
    # weights over the top two: 0.8 / 0.2 -> second expert kept with probability 0.4
    row = torch.log(torch.tensor([0.8, 0.2, 1e-9]))
    logits = row.expand(20000, 3).contiguous()
    r = identity_router(R.TopKRouter, 3, k=2, random_second=True).train()
    torch.manual_seed(0)
    out = r(logits)
    assert (out.expert == 0).sum().item() == 20000
    share = (out.expert == 1).sum().item() / 20000
    assert share == pytest.approx(0.4, abs=0.02)
    assert r.eval()(logits).num_assignments == 40000


def test_switch_is_k1():
    r = R.TopKRouter(8, 4, k=1)
    out = r(torch.randn(10, 8))
    assert out.num_assignments == 10 and torch.equal(out.token.sort().values, torch.arange(10))


# -- BatchPrioritizedRouter -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["case01", "case02"])
def test_bpr_router_matches_vmoe_router(vmoe_reference, case):
    d = {k[len(f"router/{case}/"):]: v for k, v in vmoe_reference.items() if k.startswith(f"router/{case}/")}
    x = torch.from_numpy(d["x"])  # (G, S, D)
    groups, size, dim = x.shape
    experts = int(d["num_experts"])
    r = R.BatchPrioritizedRouter(dim, experts, int(d["k"]), capacity_factor=float(d["capacity_factor"]),
                                 batch_priority=bool(d["batch_priority"]), group_size=size,
                                 capacity_multiple_of=int(d["capacity_multiple_of"])).eval()
    with torch.no_grad():
        r.gate.weight.copy_(torch.from_numpy(d["kernel"]).t())
    out = r(x.reshape(-1, dim))
    assert torch.allclose(out.logits, torch.from_numpy(d["logits"]).reshape(-1, experts), atol=1e-5)
    expected = torch.from_numpy(d["combine_weights"]).sum(-1).reshape(-1, experts)
    assert torch.allclose(out.dense_weights(), expected, atol=1e-6)
    assert (out.dense_weights() > 0).eq(expected > 0).all()
    assert out.losses["importance"].item() == pytest.approx(float(d["metrics/importance_loss"].mean()), rel=1e-5)


@pytest.mark.parametrize("case", ["case00", "case03"])
def test_bpr_dispatch_with_explicit_capacity_matches_vmoe(vmoe_reference, case):
    d = {k[len(f"router/{case}/"):]: v for k, v in vmoe_reference.items() if k.startswith(f"router/{case}/")}
    logits = torch.from_numpy(d["logits"])
    groups, size, experts = logits.shape
    probs = torch.softmax(logits.reshape(-1, experts), -1)
    tok, exp, w = RF.top_k_assign(probs, int(d["k"]), int(d["capacity"]), bool(d["batch_priority"]), group_size=size)
    dense = torch.zeros_like(probs).index_put((tok, exp), w)
    assert torch.allclose(dense, torch.from_numpy(d["combine_weights"]).sum(-1).reshape(-1, experts), atol=1e-6)


def test_bpr_drops_lowest_priority_tokens_first():
    # E=1, k=1: capacity ceil(6*1*0.5/1)=3 places; BPR keeps the 3 most confident tokens.
    # With one expert every probability is 1, so use two experts where expert 0 is everyone's top-1.
    logits = torch.tensor([[1.0, 0], [3.0, 0], [0.5, 0], [2.0, 0], [4.0, 0], [0.1, 0]])
    r = identity_router(R.BatchPrioritizedRouter, 2, k=1, capacity_factor=0.5, capacity_multiple_of=None,
                        noise_std=0.0).eval()
    # capacity = ceil(6 * 0.5 / 2) = 2 per expert; expert 0 keeps the 2 highest-priority tokens.
    out = r(logits)
    assert sorted(out.token.tolist()) == [1, 4]
    r.batch_priority = False
    assert sorted(r(logits).token.tolist()) == [0, 1]


def test_bpr_groups_route_independently():
    logits = torch.tensor([[2.0, 0.0]] * 4 + [[2.0, 0.0]] * 4)
    r = identity_router(R.BatchPrioritizedRouter, 2, k=1, capacity_factor=0.5, capacity_multiple_of=None,
                        group_size=4, noise_std=0.0, batch_priority=False).eval()
    out = r(logits)
    # capacity ceil(4*0.5/2)=1 per group: token 0 of each group.
    assert out.token.tolist() == [0, 4]


def test_bpr_noise_std_is_one_over_experts():
    r = R.BatchPrioritizedRouter(4, 8, 2)
    assert r.noise_std / r.num_experts == pytest.approx(1 / 8)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    train_out = r.train()(x)
    assert set(train_out.losses) == {"importance", "load"}
    assert set(r.eval()(x).losses) == {"importance"}


# -- other routers ----------------------------------------------------------------------------

def test_expert_choice_router_gives_every_expert_c_tokens():
    r = R.ExpertChoiceRouter(8, 4, capacity_factor=2.0)
    out = r(torch.randn(20, 8))
    assert torch.equal(out.tokens_per_expert(), torch.full((4,), 10))


def test_balanced_assignment_router_balances_in_training_only():
    x = torch.randn(32, 4) + torch.tensor([3.0, 0, 0, 0])
    r = identity_router(R.BalancedAssignmentRouter, 4)
    assert torch.equal(r.train()(x).tokens_per_expert(), torch.full((4,), 8))
    greedy = r.eval()(x)
    assert torch.equal(greedy.expert, x.argmax(-1))
    assert torch.allclose(greedy.weight, torch.sigmoid(x.max(-1).values))


def test_sinkhorn_router_spreads_skewed_logits():
    x = torch.randn(64, 4) * 0.1 + torch.tensor([2.0, 0, 0, 0])
    r = identity_router(R.SinkhornRouter, 4, k=1)
    assert r.eval()(x).tokens_per_expert()[0] == 64
    balanced = r.train()(x).tokens_per_expert()
    assert balanced.max() <= 24
    out = r.train()(x)
    assert torch.allclose(out.weight, torch.softmax(x, -1)[out.token, out.expert])


def test_sigmoid_router_bias_steers_selection_not_weights():
    x = torch.tensor([[1.0, 0.5, 0.0]] * 6)
    r = identity_router(R.SigmoidRouter, 3, k=1, bias_update_rate=0.25).train()
    first = r(x)
    assert first.expert.tolist() == [0] * 6
    assert torch.equal(r.bias, torch.zeros(3))  # forwards only count; the optimiser step updates
    r.update_after_step()
    # load (6, 0, 0), mean 2: bias becomes (-0.25, +0.25, +0.25)
    assert torch.allclose(r.bias, torch.tensor([-0.25, 0.25, 0.25]))
    second = r(x)
    assert second.expert.tolist() == [1] * 6  # 0.62 + 0.25 > 0.73 - 0.25
    assert torch.allclose(second.weight, torch.sigmoid(torch.tensor(0.5)).expand(6))


def test_hash_router_is_deterministic_and_needs_ids():
    r = R.HashRouter(4, 8)
    ids = torch.arange(4000)
    out = r(torch.randn(4000, 4), token_ids=ids)
    again = r(torch.randn(4000, 4), token_ids=ids)
    assert torch.equal(out.expert, again.expert)
    counts = out.tokens_per_expert().float()
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500
    with pytest.raises(ValueError, match="needs token_ids"):
        r(torch.randn(3, 4))
    pos = R.HashRouter(4, 8, key="position")
    assert pos(torch.randn(3, 4), positions=torch.tensor([0, 1, 0])).expert[0] == pos(
        torch.randn(1, 4), positions=torch.tensor([0])).expert[0]


# -- shared behaviour -------------------------------------------------------------------------

ALL = [R.TopKRouter, R.BatchPrioritizedRouter, R.ExpertChoiceRouter, R.BalancedAssignmentRouter,
       R.SinkhornRouter, R.SigmoidRouter, R.SparseMixerRouter,
       functools.partial(R.GroupLimitedRouter, k=2, num_groups=2, topk_group=1)]


@pytest.mark.parametrize("cls", ALL)
def test_router_math_is_fp32_under_autocast(cls):
    r = cls(8, 4)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.logits.dtype == torch.float32
    assert out.weight.dtype == torch.float32


@pytest.mark.parametrize("cls", ALL)
def test_router_rejects_bad_input(cls):
    r = cls(8, 4)
    with pytest.raises(ValueError, match="shape"):
        r(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="dim=8"):
        r(torch.randn(5, 7))
    bad = torch.randn(5, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        r(bad)
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        r(bad)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: R.TopKRouter(8, 4, k=5), "k must be"),
        (lambda: R.TopKRouter(8, 4, k=0), "k must be"),
        (lambda: R.TopKRouter(8, 4, capacity_factor=0.0), "capacity_factor"),
        (lambda: R.TopKRouter(8, 4, capacity_factor=-1.0), "capacity_factor"),
        (lambda: R.BatchPrioritizedRouter(8, 4, k=5), "k must be"),
        (lambda: R.BatchPrioritizedRouter(8, 4, capacity_factor=0), "capacity_factor"),
        (lambda: R.ExpertChoiceRouter(8, 4, capacity_factor=0), "capacity_factor"),
        (lambda: R.SigmoidRouter(8, 4, k=9), "k must be"),
        (lambda: R.TopKRouter(8, 0), "num_experts"),
        (lambda: R.TopKRouter(8, 4, order="sideways"), "order must be"),
        (lambda: R.HashRouter(8, 4, key="colour"), "key must be"),
        (lambda: R.TopKRouter(8, 4, scale=0.0), "scale must be"),
        (lambda: R.SigmoidRouter(8, 4, normalize_eps=-1.0), "normalize_eps must be"),
        (lambda: R.GroupLimitedRouter(8, 6, k=2, num_groups=4), "num_groups must divide num_experts=6"),
        (lambda: R.GroupLimitedRouter(8, 8, k=2, num_groups=4, topk_group=5), "topk_group must be <= num_groups=4"),
        (lambda: R.GroupLimitedRouter(8, 8, k=2, num_groups=4, topk_group=2, group_top=3), "group_top must be <= the 2"),
        (lambda: R.GroupLimitedRouter(8, 8, k=5, num_groups=4, topk_group=2), "k must be <= topk_group x"),
        (lambda: R.GroupLimitedRouter(8, 8, k=2, num_groups=4, topk_group=2, scores="tanh"), "scores must be one of"),
        (lambda: R.SparseMixerRouter(8, 4, jitter_eps=-0.1), "jitter_eps must be"),
    ],
)
def test_router_construction_validates(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_routers_build_from_yaml_class_path():
    parser = ArgumentParser()
    parser.add_argument("--router", type=R.Router)
    cfg = parser.parse_string(
        "router:\n  class_path: moezoo.routers.TopKRouter\n  init_args:\n    dim: 16\n    num_experts: 4\n    k: 1\n"
    )
    router = parser.instantiate(cfg).router
    assert isinstance(router, R.TopKRouter) and router.k == 1 and router.num_experts == 4
    cfg = parser.parse_string(
        "router:\n  class_path: moezoo.routers.GroupLimitedRouter\n  init_args:\n    dim: 16\n    num_experts: 8\n"
        "    k: 2\n    num_groups: 4\n    topk_group: 2\n    scale: 2.5\n"
    )
    router = parser.instantiate(cfg).router
    assert isinstance(router, R.GroupLimitedRouter) and (router.num_groups, router.topk_group, router.scale) == (4, 2, 2.5)
    cfg = parser.parse_string("router:\n  class_path: moezoo.routers.SparseMixerRouter\n  init_args:\n    dim: 16\n"
                              "    num_experts: 4\n    jitter_eps: 0.05\n")
    router = parser.instantiate(cfg).router
    assert isinstance(router, R.SparseMixerRouter) and router.jitter_eps == 0.05 and router.k == 2


def test_a_models_router_is_chosen_in_yaml():
    # The layer supplies dim and num_experts; the YAML names the router and its other settings.
    from moezoo.modalities.vision import VisionTransformerMoE

    parser = ArgumentParser()
    parser.add_argument("--model", type=VisionTransformerMoE)
    cfg = parser.parse_string(
        "model:\n  class_path: moezoo.modalities.vision.VisionTransformerMoE\n  init_args:\n"
        "    img_size: 16\n    patch_size: 4\n    in_chans: 1\n    num_classes: 10\n    embed_dim: 16\n"
        "    depth: 2\n    num_heads: 2\n    num_experts: 4\n    moe_blocks: every_2\n"
        "    router:\n      class_path: moezoo.routers.ExpertChoiceRouter\n"
        "      init_args:\n        capacity_factor: 0.5\n"
    )
    model = parser.instantiate(cfg).model
    routers = [layer.router for layer in model.moe_layers()]
    assert routers and all(isinstance(r, R.ExpertChoiceRouter) and r.num_experts == 4 and r.dim == 16 for r in routers)
    assert routers[0].capacity_factor == 0.5


# -- E^3: experts partitioned per ensemble member ----------------------------------------------

def test_bpr_ensemble_routes_each_member_to_its_own_experts():
    # 4 experts, 2 members: tokens 0, 2 are member 0 (experts 0, 1), tokens 1, 3 member 1 (2, 3).
    logits = torch.tensor([[3.0, 0.0, 9.0, 9.0], [9.0, 9.0, 0.5, 0.0], [2.0, 0.0, 0.0, 9.0], [9.0, 0.0, 0.0, 1.0]])
    r = identity_router(R.BatchPrioritizedRouter, 4, k=1, capacity_factor=0.5, capacity_multiple_of=None,
                        noise_std=0.0, ensemble_size=2).eval()
    out = r(logits)
    # capacity ceil(1 * 4 * 0.5 / 4) = 1 per expert over the whole group: tokens 0 and 2 both
    # want expert 0; BPR keeps token 0 (softmax([3, 0]) beats softmax([2, 0])).
    assert sorted(zip(out.token.tolist(), out.expert.tolist())) == [(0, 0), (1, 2), (3, 3)]
    own = {0: [0, 1], 1: [2, 3], 3: [2, 3]}
    expected = {t: torch.softmax(logits[t, own[t]], 0).max() for t in own}
    assert all(torch.isclose(w, expected[t]) for t, w in zip(out.token.tolist(), out.weight))
    assert torch.isinf(out.logits[0, 2:]).all() and torch.isinf(out.logits[1, :2]).all()


def test_bpr_ensemble_importance_loss_is_the_members_mean():
    torch.manual_seed(0)
    logits = torch.randn(12, 6)
    r = identity_router(R.BatchPrioritizedRouter, 6, k=1, noise_std=0.0, ensemble_size=3, group_size=6).eval()
    loss = r(logits).losses["importance"]

    def cv2(p):  # population variance / mean^2 of the per-expert probability mass
        mass = p.sum(0)
        return mass.var(unbiased=False) / mass.mean() ** 2

    expected = torch.stack([cv2(torch.softmax(logits[g * 6 + m : (g + 1) * 6 : 3, 2 * m : 2 * m + 2], -1))
                            for g in range(2) for m in range(3)]).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=6, ensemble_size=4), "multiple of ensemble_size"),
    (dict(num_experts=4, ensemble_size=2, k=3), "k must be <= num_experts=4 / ensemble_size=2"),
    (dict(num_experts=4, ensemble_size=2, group_size=5), "group_size=5 must be a multiple"),
])
def test_bpr_ensemble_construction_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        R.BatchPrioritizedRouter(8, **{"k": 1, **kwargs})
