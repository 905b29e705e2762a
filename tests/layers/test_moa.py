"""MixtureOfAttentionHeads: the official MoA layer's outputs, losses and gradients (fixture), a naive
per-token loop, reduction to standard attention, causal masking, recorded losses and stats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DATA

from moezoo.layers import aux_loss, routing_stats
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.routers.losses import moa_cv_loss
from moezoo.routers.moa import MOA_LOSS_WEIGHTS, MoARouter

REFERENCE = np.load(DATA / "text_moa_reference.npz")
META = json.loads(str(REFERENCE["meta"]))


def _layer_from_reference(case: str) -> tuple[MixtureOfAttentionHeads, dict]:
    m = META[case]
    ref = {k.split("/", 1)[1]: torch.tensor(REFERENCE[k]) for k in REFERENCE.files if k.startswith(case + "/")}
    layer = MixtureOfAttentionHeads(m["dim"], m["num_experts"], m["k"], m["head_dim"], noisy_gating=m.get("noisy", False),
                                    sample_topk=m.get("sample_topk", 0)).train(m.get("train", False))
    with torch.no_grad():
        layer.router.gate.weight.copy_(ref["gate"].t())
        if "noise" in ref:
            layer.router.noise.weight.copy_(ref["noise"].t())
        layer.w_q.copy_(ref["w_q"])
        layer.w_o.copy_(ref["w_o"])
        layer.k_proj.weight.copy_(ref["k_proj"])
        layer.v_proj.weight.copy_(ref["v_proj"])
    return layer, ref


@pytest.mark.parametrize("case", sorted(META))
def test_matches_the_official_moa_layer(case):
    """Eval and training (noisy gating: z-loss on the noisy logits; sampled top-k), query and key
    padding masks: outputs (padded queries: zero), each loss, and every gradient."""
    layer, ref = _layer_from_reference(case)
    m = META[case]
    cross = m["memory"] is not None
    # The reference is time-major (T, B, D).
    x = ref["x"].transpose(0, 1).contiguous().requires_grad_(True)
    memory = ref["memory"].transpose(0, 1).contiguous().requires_grad_(True) if cross else None
    if "rng_state" in ref:  # the reference's generator state at its forward: the same noise and samples
        torch.set_rng_state(ref["rng_state"])
    out = layer(x, memory, causal=m.get("causal", not cross), key_padding_mask=ref.get("key_padding_mask"),
                query_padding_mask=ref.get("query_padding_mask"))
    torch.testing.assert_close(out.transpose(0, 1), ref["out"].float(), atol=2e-6, rtol=1e-5)
    losses = layer.last_losses
    torch.testing.assert_close(losses["load_balancing"], ref["loss_switch"].float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses["z_loss"], ref["loss_z"].float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(losses["cv"], ref["loss_cv"].float(), atol=1e-6, rtol=1e-5)
    w = m["weights"]
    aux = aux_loss(layer, {"cv": w["cv"], "load_balancing": w["switch"], "z_loss": w["z"]})
    torch.testing.assert_close(aux, ref["aux_weighted"].float(), atol=1e-6, rtol=1e-5)
    ((out.transpose(0, 1) * ref["r"]).sum() + aux).backward()
    torch.testing.assert_close(x.grad.transpose(0, 1), ref["grad_x"], atol=5e-6, rtol=1e-4)
    if cross:
        torch.testing.assert_close(memory.grad.transpose(0, 1), ref["grad_memory"], atol=5e-6, rtol=1e-4)
    grads = {"gate": layer.router.gate.weight.grad.t(), "w_q": layer.w_q.grad, "w_o": layer.w_o.grad,
             "k_proj": layer.k_proj.weight.grad, "v_proj": layer.v_proj.weight.grad}
    if "noise" in ref:
        grads["noise"] = layer.router.noise.weight.grad.t()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["grad_" + name], atol=5e-6, rtol=1e-4, msg=name)


def test_noisy_training_z_loss_is_on_the_noisy_logits_and_padded_queries_route_nowhere():
    torch.manual_seed(0)
    router = MoARouter(8, 4, 2, noisy=True).train()
    with torch.no_grad():
        router.gate.weight.normal_()
        router.noise.weight.normal_()
    x = torch.randn(10, 8)
    state = torch.get_rng_state()
    routing = router(x)
    torch.set_rng_state(state)
    clean = x @ router.gate.weight.t()
    noisy = clean + torch.randn_like(clean) * (F.softplus(x @ router.noise.weight.t()) + 1e-2)
    torch.testing.assert_close(routing.losses["z_loss"], torch.logsumexp(noisy, -1).pow(2).mean())
    padded = torch.zeros(10, dtype=torch.bool)
    padded[7:] = True
    routing = router.eval()(x, padding_mask=padded)
    assert set(routing.token.tolist()) == set(range(7)) and routing.num_assignments == 14
    with pytest.raises(ValueError, match="sample_topk must be <= k=2"):
        MoARouter(8, 4, 2, sample_topk=3)


def naive_moa(layer: MixtureOfAttentionHeads, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Explicit loops over sequences, tokens and their k selected heads."""
    batch, tokens, dim = x.shape
    out = torch.zeros_like(x)
    d = layer.head_dim
    for b in range(batch):
        keys, values = x[b] @ layer.k_proj.weight.t(), x[b] @ layer.v_proj.weight.t()
        for t in range(tokens):
            probs = torch.softmax(x[b, t] @ layer.router.gate.weight.t(), -1)
            for e in torch.topk(probs, layer.k).indices.tolist():
                q = x[b, t] @ layer.w_q[e]
                seen = t + 1 if causal else tokens
                attn = torch.softmax(keys[:seen] @ q / math.sqrt(d), -1)
                out[b, t] += probs[e] * ((attn @ values[:seen]) @ layer.w_o[e])
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_equals_a_naive_per_token_loop(causal):
    torch.manual_seed(0)
    layer = MixtureOfAttentionHeads(12, num_experts=5, k=3, head_dim=6).eval()
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    x = torch.randn(2, 6, 12)
    torch.testing.assert_close(layer(x, causal=causal), naive_moa(layer, x, causal), atol=1e-5, rtol=1e-5)


def test_one_expert_is_standard_single_head_attention():
    torch.manual_seed(1)
    dim = 16
    layer = MixtureOfAttentionHeads(dim, num_experts=1, k=1, head_dim=dim).eval()
    mha = torch.nn.MultiheadAttention(dim, 1, bias=False, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.w_q[0].t(), layer.k_proj.weight, layer.v_proj.weight]))
        mha.out_proj.weight.copy_(layer.w_o[0].t())
    x = torch.randn(3, 7, dim)
    causal_mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    expected, _ = mha(x, x, x, attn_mask=causal_mask, need_weights=False)
    torch.testing.assert_close(layer(x, causal=True), expected, atol=1e-6, rtol=1e-5)


def test_causal_output_ignores_future_tokens():
    torch.manual_seed(2)
    layer = MixtureOfAttentionHeads(12, num_experts=4, k=2, head_dim=8, rotate_fraction=0.5).eval()
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    x = torch.randn(1, 8, 12)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, 12)
    a, b = layer(x, causal=True), layer(changed, causal=True)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_router_and_init_follow_the_reference():
    layer = MixtureOfAttentionHeads(32, num_experts=8, k=2, head_dim=16)
    assert torch.count_nonzero(layer.router.gate.weight) == 0  # zero-initialised gate
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (32 + 16))
    assert layer.w_q.abs().max() <= bound and layer.w_q.abs().max() > 0.9 * bound
    assert layer.aux_loss_weights == MOA_LOSS_WEIGHTS
    router = MoARouter(4, 3, k=2)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(5, 4)
    routing = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    # Weights are the softmax probabilities themselves: not renormalised over the top k.
    torch.testing.assert_close(routing.dense_weights().sum(-1), torch.topk(probs, 2).values.sum(-1))


def test_moa_cv_loss_hand_worked():
    gates = torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.3, 0.0]])
    share = torch.tensor([0.5, 0.3, 0.2])  # column sums / total
    expected = share.var(unbiased=True) / (share.mean() ** 2 + 1e-10)
    torch.testing.assert_close(moa_cv_loss(gates), expected)
    assert moa_cv_loss(torch.ones(4, 1)).item() == 0.0


def test_records_losses_and_stats_for_the_monitor():
    layer = MixtureOfAttentionHeads(8, num_experts=4, k=2, head_dim=4).train()
    layer(torch.randn(2, 5, 8), causal=True)
    stats = routing_stats(layer)[type(layer).__name__]
    assert stats["tokens_per_expert"].sum() == 2 * 5 * 2
    assert {"loss/load_balancing", "loss/z_loss", "loss/cv"} <= set(stats)
    expected = 0.01 * layer.last_losses["load_balancing"] + 0.001 * layer.last_losses["z_loss"]
    torch.testing.assert_close(aux_loss(layer), expected)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        MixtureOfAttentionHeads(8, num_experts=2, k=3)
    with pytest.raises(ValueError, match="x must be"):
        MixtureOfAttentionHeads(8, num_experts=2, k=1)(torch.randn(2, 8))
    # Gradient flows to every parameter (the zero router too, through the gate weights).
    layer = MixtureOfAttentionHeads(8, num_experts=3, k=2, head_dim=4)
    F.mse_loss(layer(torch.randn(2, 4, 8), causal=True), torch.zeros(2, 4, 8)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_every_expert_selected_is_multi_query_attention_with_router_weights():
    # MoA's experts share one key and one value projection (as in the paper); with k = E every
    # head is used, weighted by the router's softmax (uniform for the zero-initialised gate).
    torch.manual_seed(3)
    dim, heads, head_dim = 12, 3, 4
    layer = MixtureOfAttentionHeads(dim, num_experts=heads, k=heads, head_dim=head_dim).eval()
    x = torch.randn(2, 5, dim)
    k, v = layer.k_proj(x), layer.v_proj(x)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = 0
    for i in range(heads):
        scores = (x @ layer.w_q[i]) @ k.transpose(1, 2) / head_dim**0.5
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        expected = expected + attn @ layer.w_o[i] / heads
    torch.testing.assert_close(layer(x, causal=True), expected, atol=1e-5, rtol=1e-5)
