"""SwitchHeadAttention: the official SwitchHead layer (Triton CVMM) outputs and gradients (fixture), a naive
per-head loop, reduction to standard multi-head attention, causal masking, the selector, expert_linear.
SwitchHeadXLAttention: the authors' training-code layer with Transformer-XL positions and memory (fixture)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA

from moezoo.kernels import expert_linear
from moezoo.layers import routing_stats
from moezoo.layers.switchhead import SwitchHeadAttention, SwitchHeadXLAttention
from moezoo.routers.routing import Routing
from moezoo.routers.switchhead import SwitchHeadSelector, renorm_rows_

REFERENCE = np.load(DATA / "text_switchhead_reference.npz")
META = json.loads(str(REFERENCE["meta"]))
XL = np.load(DATA / "xl_attention_reference.npz")
XL_META = json.loads(str(XL["meta"]))
#: The reference's parameter names -> ours (SwitchHeadXLAttention's docstring).
XL_NAMES = {"projections.q": "q.weight", "projections.k": "k_proj.weight", "projections.v": "v_experts.weight",
            "projections.o": "o_experts.weight", "selections.v": "sel_v.gate.weight",
            "selections.o": "sel_o.gate.weight", "pos_to_pk": "pos_to_pk"}


@pytest.mark.parametrize("case", sorted(META))
def test_matches_the_official_switchhead_layer(case):
    m = META[case]
    ref = {k.split("/", 1)[1]: torch.tensor(REFERENCE[k]) for k in REFERENCE.files if k.startswith(case + "/")}
    heads, experts, d, dim = m["num_heads"], m["num_experts"], m["head_dim"], m["dim"]
    layer = SwitchHeadAttention(dim, heads, experts, d, m["k"], rotate_fraction=m["rotate_fraction"]).eval()
    with torch.no_grad():
        layer.q.weight.copy_(ref["q.weight"])
        layer.k_proj.weight.copy_(ref["k.weight"])
        layer.sel_o.gate.weight.copy_(ref["sel_o"])
        if experts > 1:
            layer.v.copy_(ref["v"])
            layer.o.copy_(ref["o"])
            layer.sel_v.gate.weight.copy_(ref["sel_v"])
        else:  # the reference stores the one-expert case as dense Linear weights
            layer.v.copy_(ref["v"].view(heads, d, dim).transpose(1, 2))
            layer.o.copy_(ref["o"].t().reshape(heads, d, dim))
    x = ref["x"].clone().requires_grad_(True)
    out = layer(x, causal=True)
    torch.testing.assert_close(out, ref["out"], atol=2e-6, rtol=1e-5)
    (out * ref["r"]).sum().backward()
    torch.testing.assert_close(x.grad, ref["grad_x"], atol=5e-6, rtol=1e-4)
    grads = {"q.weight": layer.q.weight.grad, "k.weight": layer.k_proj.weight.grad, "sel_o": layer.sel_o.gate.weight.grad}
    if experts > 1:
        grads.update({"v": layer.v.grad, "o": layer.o.grad, "sel_v": layer.sel_v.gate.weight.grad})
    else:
        grads.update({"v": layer.v.grad.transpose(1, 2).reshape(heads * d, dim),
                      "o": layer.o.grad.reshape(heads * d, dim).t()})
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["grad_" + name], atol=5e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["switchhead_memory", "switchhead_no_memory"])
def test_xl_variant_matches_the_authors_training_code(case):
    m = XL_META[case]
    ref = {k.split("/", 1)[1]: torch.tensor(XL[k]) for k in XL.files if k.startswith(case + "/")}
    layer = SwitchHeadXLAttention(m["dim"], m["heads"], m["experts"], m["head_dim"], m["k"]).eval()
    layer.load_state_dict({ours: ref[theirs] for theirs, ours in XL_NAMES.items()})
    x = ref["x"].clone().requires_grad_(True)
    memory = ref["memory"].clone().requires_grad_(True) if m["memory"] else None
    out = layer(x, memory)
    torch.testing.assert_close(out, ref["out"], atol=1e-6, rtol=1e-5)
    (out * ref["r"]).sum().backward()
    torch.testing.assert_close(x.grad, ref["grad_x"], atol=1e-6, rtol=1e-5)
    if memory is not None:
        torch.testing.assert_close(memory.grad, ref["grad_memory"], atol=1e-6, rtol=1e-5)
    params = dict(layer.named_parameters())
    for theirs, ours in XL_NAMES.items():
        torch.testing.assert_close(params[ours].grad, ref["grad_" + theirs], atol=1e-6, rtol=1e-5, msg=theirs)


def test_xl_memory_equals_attending_over_the_concatenated_sequence():
    # Relative positions only: the last T queries of [memory, x] see the same keys at the same distances.
    torch.manual_seed(0)
    layer = SwitchHeadXLAttention(12, num_heads=2, num_experts=3, head_dim=6, k=2).eval()
    memory, x = torch.randn(2, 4, 12), torch.randn(2, 3, 12)
    full = layer(torch.cat([memory, x], 1))[:, -3:]
    torch.testing.assert_close(layer(x, memory), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory must be"):
        layer(x, torch.randn(1, 4, 12))


def naive_switchhead(layer: SwitchHeadAttention, x, memory, causal, key_padding_mask=None):
    """Explicit loops over sequences, heads, tokens and selected experts (no RoPE)."""
    batch, tokens, dim = x.shape
    src = x if memory is None else memory
    heads, experts, d, k = layer.num_heads, layer.num_experts, layer.head_dim, layer.k
    out = torch.zeros_like(x)
    sel_v = torch.sigmoid(src @ layer.sel_v.gate.weight.t()).view(batch, -1, heads, experts)
    sel_o = torch.sigmoid(x @ layer.sel_o.gate.weight.t()).view(batch, tokens, heads, experts)
    for b in range(batch):
        for h in range(heads):
            q = x[b] @ layer.q.weight[h * d:(h + 1) * d].t()
            key = src[b] @ layer.k_proj.weight[h * d:(h + 1) * d].t()
            value = torch.zeros(src.shape[1], d)
            for s in range(src.shape[1]):
                for e in torch.topk(sel_v[b, s, h], k).indices.tolist():
                    value[s] += sel_v[b, s, h, e] * (src[b, s] @ layer.v[h * experts + e])
            for t in range(tokens):
                allowed = torch.ones(src.shape[1], dtype=torch.bool)
                if causal:
                    allowed[t + 1:] = False
                if key_padding_mask is not None:
                    allowed &= ~key_padding_mask[b]
                scores = (key @ q[t]) / math.sqrt(d)
                attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
                res = attn @ value
                for e in torch.topk(sel_o[b, t, h], k).indices.tolist():
                    out[b, t] += sel_o[b, t, h, e] * (res @ layer.o[h * experts + e])
    return out


def test_equals_a_naive_per_head_loop_causal():
    torch.manual_seed(0)
    layer = SwitchHeadAttention(12, num_heads=3, num_experts=4, head_dim=4, k=2, rotate_fraction=0.0).eval()
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x, causal=True), naive_switchhead(layer, x, None, True), atol=1e-5, rtol=1e-5)


def test_equals_a_naive_per_head_loop_cross_attention_with_padding():
    torch.manual_seed(1)
    layer = SwitchHeadAttention(8, num_heads=2, num_experts=3, head_dim=4, k=2, rotate_fraction=0.0).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    expected = naive_switchhead(layer, x, memory, False, padding)
    torch.testing.assert_close(layer(x, memory, key_padding_mask=padding), expected, atol=1e-5, rtol=1e-5)


def test_one_expert_per_head_with_an_open_gate_is_standard_multi_head_attention():
    torch.manual_seed(2)
    dim, heads = 16, 4
    layer = SwitchHeadAttention(dim, heads, num_experts=1, k=1, rotate_fraction=0.0).eval()
    d = layer.head_dim
    with torch.no_grad():  # the output gate sigmoid(x . w) is exactly 1.0 in fp32 for these inputs
        layer.sel_o.gate.weight.fill_(100.0)
    x = torch.rand(2, 6, dim) + 0.5
    mha = torch.nn.MultiheadAttention(dim, heads, bias=False, batch_first=True).eval()
    with torch.no_grad():
        w_v = layer.v.transpose(1, 2).reshape(heads * d, dim)
        mha.in_proj_weight.copy_(torch.cat([layer.q.weight, layer.k_proj.weight, w_v]))
        mha.out_proj.weight.copy_(layer.o.reshape(heads * d, dim).t())
    expected, _ = mha(x, x, x, attn_mask=torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), need_weights=False)
    torch.testing.assert_close(layer(x, causal=True), expected, atol=1e-6, rtol=1e-5)


def test_causal_output_ignores_future_tokens():
    torch.manual_seed(3)
    layer = SwitchHeadAttention(16, num_heads=2, num_experts=4, head_dim=8, k=2).eval()
    x = torch.randn(2, 9, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 3, 16)
    a, b = layer(x, causal=True), layer(changed, causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_selector_picks_top_k_sigmoid_per_head_without_renormalisation():
    torch.manual_seed(4)
    selector = SwitchHeadSelector(6, num_heads=2, num_experts=4, k=2).eval()
    x = torch.randn(5, 6)
    routing = selector(x)
    scores = torch.sigmoid(x @ selector.gate.weight.t()).view(5, 2, 4)
    dense = routing.dense_weights().view(5, 2, 2, 4)  # rows t*H + h, experts h*E + e
    for h in range(2):
        block = dense[:, h, h]  # head h's rows only use head h's experts
        expected = torch.zeros(5, 4).scatter(1, torch.topk(scores[:, h], 2).indices, torch.topk(scores[:, h], 2).values)
        torch.testing.assert_close(block, expected)
        assert dense[:, h, 1 - h].abs().sum() == 0


def test_renorm_rows_hand_worked():
    # Reference renorm_rows: unit rows, then times (row std before) / (overall std after).
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    renorm_rows_(w)
    overall = torch.tensor([0.6, 0.8, 0.0, 1.0]).std()  # 0.43205
    expected = torch.tensor([[0.6, 0.8], [0.0, 1.0]]) * torch.tensor([[0.5 ** 0.5], [2 ** 0.5]]) / overall
    torch.testing.assert_close(w, expected)


def test_expert_dropout_never_selects_a_dropped_expert_when_enough_remain():
    torch.manual_seed(5)
    selector = SwitchHeadSelector(6, num_heads=1, num_experts=8, k=2, expert_dropout=0.5).train()
    x = torch.randn(64, 6)
    torch.manual_seed(6)
    routing = selector(x)
    torch.manual_seed(6)
    dropped = torch.rand(64, 8) < 0.5
    chosen = torch.zeros(64, 8, dtype=torch.bool)
    chosen[routing.token, routing.expert] = True
    enough = (~dropped).sum(1) >= 2
    assert not (chosen & dropped)[enough].any()
    scores = torch.sigmoid(x @ selector.gate.weight.t())
    torch.testing.assert_close(routing.weight, scores[routing.token, routing.expert])


def test_expert_linear_equals_a_per_assignment_loop():
    torch.manual_seed(7)
    x, w = torch.randn(6, 5), torch.randn(3, 5, 4)
    token = torch.tensor([0, 1, 1, 3, 5, 5, 5])
    expert = torch.tensor([2, 0, 1, 1, 0, 2, 1])
    weight = torch.randn(7)
    out = expert_linear(x, Routing(token, expert, weight, 6, 3), w)
    expected = torch.zeros(6, 4)
    for a in range(7):
        expected[token[a]] += weight[a] * (x[token[a]] @ w[expert[a]])
    torch.testing.assert_close(out, expected)


def test_records_stats_and_optional_entropy_regulariser():
    layer = SwitchHeadAttention(8, num_heads=2, num_experts=3, head_dim=4, k=2).train()
    layer(torch.randn(2, 5, 8), causal=True)
    stats = routing_stats(layer)[type(layer).__name__]
    assert stats["tokens_per_expert"].shape == (6,) and stats["tokens_per_expert"].sum() == 2 * 5 * 2 * 2
    assert stats["tokens_per_expert_v"].sum() == 2 * 5 * 2 * 2
    assert layer.aux_loss_weights == {}  # the paper uses no regulariser
    assert -math.log(3) - 1e-5 <= layer.last_losses["entropy_reg"].item() / 2 <= 0
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        SwitchHeadAttention(8, 2, num_experts=2, k=3)
