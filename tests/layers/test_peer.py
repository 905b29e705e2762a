"""PEER: product-key retrieval against brute force over all N keys, the layer against a naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import PEER, parameter_counts
from moezoo.layers.peer import product_key_top_k


def full_keys(sub_keys):
    """(N, d): key of expert a * n + b is concat(K1[a], K2[b])."""
    n = sub_keys.shape[1]
    a, b = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    return torch.cat([sub_keys[0][a], sub_keys[1][b]], dim=-1)


@pytest.mark.parametrize("n, k, d", [(7, 3, 8), (16, 16, 6), (10, 1, 4)])
def test_product_key_top_k_equals_brute_force(n, k, d):
    g = torch.Generator().manual_seed(n * 100 + k)
    sub_keys = torch.randn(2, n, d // 2, generator=g, dtype=torch.float64)
    query = torch.randn(5, 3, d, generator=g, dtype=torch.float64)
    scores, index = product_key_top_k(query, sub_keys, k)
    ref_scores, ref_index = (query @ full_keys(sub_keys).t()).topk(k, dim=-1)
    assert torch.equal(index, ref_index)
    assert torch.allclose(scores, ref_scores, atol=1e-12)


@pytest.mark.parametrize("batch_norm, activation", [(True, "gelu"), (False, "relu")])
def test_layer_equals_naive_loop_over_all_experts(batch_norm, activation):
    torch.manual_seed(0)
    dim, n, heads, k, d_key = 6, 5, 3, 4, 8
    layer = PEER(dim, n * n, heads=heads, k=k, key_dim=d_key, batch_norm=batch_norm, activation=activation).double()
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    out = layer(x)
    # Naive reference: per token and head, score all N experts, brute-force top k, loop over experts.
    flat = x.reshape(-1, dim)
    q = flat @ layer.query.weight.t()
    if batch_norm:  # training-mode batch norm, by its formula
        q = (q - q.mean(0)) / torch.sqrt(q.var(0, unbiased=False) + layer.query_norm.eps)
        q = q * layer.query_norm.weight + layer.query_norm.bias
    keys = full_keys(layer.sub_keys)
    act = {"gelu": F.gelu, "relu": F.relu}[activation]
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for h in range(heads):
            scores = torch.stack([q[t, h * d_key:(h + 1) * d_key] @ keys[i] for i in range(n * n)])
            top = scores.topk(k).indices
            gates = torch.softmax(scores[top], 0)
            for g, i in zip(gates, top.tolist()):
                ref[t] += g * act(layer.down.weight[i] @ flat[t]) * layer.up.weight[i]
    assert torch.allclose(out, ref.view_as(x), atol=1e-10)
    out.sum().backward()
    assert layer.sub_keys.grad.abs().sum() > 0 and layer.down.weight.grad.abs().sum() > 0
    used = len({int(i) for i in layer.retrieve(flat)[1].reshape(-1)})
    assert layer.last_stats["experts_used_fraction"].item() == pytest.approx(used / (n * n))


def test_active_parameters():
    layer = PEER(8, 64, heads=2, k=3, key_dim=4)
    counts = parameter_counts(layer)
    total = 8 * 2 * 4 + 2 * 4 + 2 * 4 + 2 * 8 * 4 // 2 + 2 * 64 * 8  # query, BN, sub-keys, u and v
    assert counts == {"total": total, "active": total - 2 * (64 - 6) * 8}


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=50), "num_experts"),
    (dict(num_experts=49, k=8), "k"),
    (dict(key_dim=5), "key_dim"),
    (dict(heads=0), "heads"),
    (dict(activation="tanh"), "activation"),
])
def test_bad_configuration_names_the_field(kwargs, field):
    args = dict(dim=8, num_experts=49, heads=2, k=3, key_dim=4) | kwargs
    with pytest.raises(ValueError, match=field):
        PEER(**args)
