"""DeepSeekMoE's fine-grained + shared experts: the layout, equal active parameters, forward vs a naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MoE, fine_grained_config, fine_grained_moe, parameter_counts
from moezoo.modalities.text import TransformerLM
from moezoo.modalities.vision import VisionTransformerMoE
from moezoo.routers import TopKRouter


def test_layout_is_the_papers():
    # E=8 experts of 64, k=2, m=4, K_s=1: 32 experts of 16, one shared, 31 routed with 8 - 1 = 7 active.
    cfg = fine_grained_config(8, 2, 64, 4, 1)
    assert (cfg.num_experts, cfg.k, cfg.hidden, cfg.shared_experts) == (31, 7, 16, 1)
    assert fine_grained_config(8, 2, 64, 1, 0) == type(cfg)(8, 2, 64, 0)


def _expert_counts(layer: MoE) -> tuple[int, int]:
    """(active, total) expert parameters: everything but the router gate."""
    gate = layer.router.gate.weight.numel()
    counts = parameter_counts(layer)
    return counts["active"] - gate, counts["total"] - gate


@pytest.mark.parametrize("m, shared", [(2, 0), (4, 1), (4, 3), (8, 2)])
def test_active_and_total_expert_parameters_unchanged(m, shared):
    dim, experts, k, hidden = 12, 8, 2, 64
    plain = MoE(dim, hidden, experts, TopKRouter(dim, experts, k=k), bias=False)
    fine = fine_grained_moe(dim, experts, k, hidden, m, shared, bias=False)
    # Hand count: k experts of (dim x hidden in + hidden x dim out) active, E of them in all.
    assert _expert_counts(plain) == (k * 2 * dim * hidden, experts * 2 * dim * hidden)
    assert _expert_counts(fine) == _expert_counts(plain)
    assert fine.num_experts == m * experts - shared and fine.router.k == m * k - shared
    assert (fine.shared is None) == (shared == 0)


def test_forward_equals_naive_loop():
    torch.manual_seed(0)
    dim, m, shared = 10, 4, 1
    layer = fine_grained_moe(dim, 4, 2, 32, m, shared, activation="gelu", bias=True, backend="torch")
    x = torch.randn(9, dim)
    probs = torch.softmax(x @ layer.router.gate.weight.t(), dim=-1)  # (9, 15)
    e = layer.experts
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in torch.argsort(probs[t], descending=True)[: layer.router.k].tolist():
            h = F.gelu(x[t] @ e.w_in[j] + e.b_in[j])
            expected[t] += probs[t, j] * (h @ e.w_out[j] + e.b_out[j])
        s = layer.shared  # ungated: always added with weight 1
        expected[t] += F.gelu(x[t] @ s.fc1.weight.t() + s.fc1.bias) @ s.fc2.weight.t() + s.fc2.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(granularity=3), "granularity must divide the expert width hidden=64"),
    (dict(k=9), "k must be <= num_experts=8, got k=9"),
    (dict(shared_experts=8), "shared_experts must be < granularity \\* k = 8"),
    (dict(granularity=0), "granularity must be an int >= 1"),
])
def test_bad_layout_names_the_field(kwargs, field):
    args = dict(num_experts=8, k=2, hidden=64, granularity=4, shared_experts=1) | kwargs
    with pytest.raises(ValueError, match=field):
        fine_grained_config(**args)
    with pytest.raises(ValueError, match=field):
        fine_grained_moe(12, **args)


def test_fine_grained_moe_refuses_shared_settings_of_its_own():
    with pytest.raises(ValueError, match="shared_gate is set by the layout"):
        fine_grained_moe(12, 8, 2, 64, 4, 1, shared_gate=True)


def test_models_take_the_layout():
    vit = VisionTransformerMoE(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                               num_heads=2, mlp_ratio=4.0, moe_blocks=[1], num_experts=4, k=2, granularity=2,
                               shared_experts=1)
    moe = vit.moe_layers()[0]
    assert (moe.num_experts, moe.router.k, moe.hidden, moe.shared.fc1.out_features) == (7, 3, 32, 32)
    lm = TransformerLM(dim=16, depth=1, num_heads=2, mlp="moe", mlp_experts=8, mlp_hidden=64, mlp_k=2,
                       mlp_granularity=4, mlp_shared_experts=1)
    moe = lm.blocks[0].mlp
    assert (moe.num_experts, moe.router.k, moe.hidden, moe.shared.fc1.out_features) == (31, 7, 16, 16)
    x = torch.randint(0, 256, (2, 5))
    assert lm(x).shape == (2, 5, 256)
