"""RelativeMultiHeadAttention against the authors' Transformer-XL attention (tests/data/xl_references.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.layers.relative_attention import RelativeMultiHeadAttention

DATA = Path(__file__).resolve().parents[1] / "data"
REFERENCE = np.load(DATA / "xl_attention_reference.npz")
META = json.loads(str(REFERENCE["meta"]))
ATOL = 1e-6  # outputs match bit for bit; gradients differ by float32 rounding (at most 1.3e-6 seen)


def reference_parameters(case: str, heads: int, head_dim: int, dim: int) -> dict[str, torch.Tensor]:
    """The reference's parameters under our names (mapping in the class docstring)."""
    ref = {name: torch.from_numpy(REFERENCE[f"{case}/{name}"]) for name in
           ("data_to_q.weight", "data_to_kv.weight", "pos_to_pq.weight", "multi_head_merge.weight",
            "global_content_bias", "global_pos_bias", "scale")}
    kv = ref["data_to_kv.weight"].view(heads, 2, head_dim, dim)
    return {"q_proj.weight": ref["data_to_q.weight"], "k_proj.weight": kv[:, 0].reshape(-1, dim),
            "v_proj.weight": kv[:, 1].reshape(-1, dim), "pos_proj.weight": ref["pos_to_pq.weight"],
            "out_proj.weight": ref["multi_head_merge.weight"], "content_bias": ref["global_content_bias"],
            "position_bias": ref["global_pos_bias"], "scale": ref["scale"]}


def layer_for(case: str) -> RelativeMultiHeadAttention:
    m = META[case]
    layer = RelativeMultiHeadAttention(m["dim"], m["heads"], m["head_dim"]).eval()
    layer.load_state_dict(reference_parameters(case, m["heads"], m["head_dim"], m["dim"]))
    return layer


def our_grads_as_reference(layer: RelativeMultiHeadAttention) -> dict[str, torch.Tensor]:
    """Our parameter gradients under the reference's names (k and v re-fused per head)."""
    h, d, dim = layer.num_heads, layer.head_dim, layer.dim
    kv = torch.stack([layer.k_proj.weight.grad.view(h, d, dim), layer.v_proj.weight.grad.view(h, d, dim)], 1)
    return {"data_to_q.weight": layer.q_proj.weight.grad, "data_to_kv.weight": kv.reshape(-1, dim),
            "pos_to_pq.weight": layer.pos_proj.weight.grad, "multi_head_merge.weight": layer.out_proj.weight.grad,
            "global_content_bias": layer.content_bias.grad, "global_pos_bias": layer.position_bias.grad,
            "scale": layer.scale.grad}


def close(ours: torch.Tensor, key: str) -> None:
    np.testing.assert_allclose(ours.detach().numpy(), REFERENCE[key], rtol=1e-5, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("case", ["dense_memory", "dense_no_memory", "dense_long_memory"])
def test_outputs_and_every_gradient_match_the_reference(case):
    layer = layer_for(case)
    x = torch.from_numpy(REFERENCE[f"{case}/x"]).requires_grad_()
    memory = None
    if META[case]["memory"]:
        memory = torch.from_numpy(REFERENCE[f"{case}/memory"]).requires_grad_()
    out = layer(x, memory)
    close(out, f"{case}/out")
    (out * torch.from_numpy(REFERENCE[f"{case}/r"])).sum().backward()
    close(x.grad, f"{case}/grad_x")
    if memory is not None:
        close(memory.grad, f"{case}/grad_memory")
    for name, grad in our_grads_as_reference(layer).items():
        close(grad, f"{case}/grad_{name}")


def test_training_with_memory_equals_the_unrolled_two_segment_reference():
    case = "two_segments"
    layer = layer_for(case)
    x1 = torch.from_numpy(REFERENCE[f"{case}/x1"]).requires_grad_()
    x2 = torch.from_numpy(REFERENCE[f"{case}/x2"]).requires_grad_()
    out1 = layer(x1)
    out2 = layer(x2, x1.detach())  # the previous segment, detached, as the reference LM keeps it
    close(out1, f"{case}/out1")
    close(out2, f"{case}/out2")
    loss = (out1 * torch.from_numpy(REFERENCE[f"{case}/r1"])).sum()
    loss = loss + (out2 * torch.from_numpy(REFERENCE[f"{case}/r2"])).sum()
    loss.backward()
    close(x1.grad, f"{case}/grad_x1")
    close(x2.grad, f"{case}/grad_x2")
    for name, grad in our_grads_as_reference(layer).items():
        close(grad, f"{case}/grad_{name}")


def test_memory_equals_attending_over_the_concatenated_sequence():
    # Relative positions only: the last T queries of [memory, x] see the same keys at the same distances.
    torch.manual_seed(0)
    layer = RelativeMultiHeadAttention(12, 3).eval()
    with torch.no_grad():
        layer.content_bias.normal_()
        layer.position_bias.normal_()
    memory, x = torch.randn(2, 4, 12), torch.randn(2, 3, 12)
    full = layer(torch.cat([memory, x], 1))[:, -3:]
    torch.testing.assert_close(layer(x, memory), full, rtol=1e-5, atol=1e-6)
    # Without the causal mask the memory still changes the result (the keys include it).
    assert not torch.allclose(layer(x, memory, causal=False), layer(x, causal=False))


def test_init_follows_the_reference():
    layer = RelativeMultiHeadAttention(32, 4, 16)
    fused = math.sqrt(6.0 / (32 + 2 * 4 * 16))
    for w in (layer.k_proj.weight, layer.v_proj.weight):
        assert w.abs().max() <= fused and w.abs().max() > 0.9 * fused
    xavier = math.sqrt(6.0 / (32 + 64))
    assert layer.q_proj.weight.abs().max() <= xavier and layer.pos_proj.weight.abs().max() <= xavier
    assert layer.scale.item() == pytest.approx(1 / 4)
    assert torch.count_nonzero(layer.content_bias) == 0 and torch.count_nonzero(layer.position_bias) == 0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        RelativeMultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="dim=10 must be a multiple of num_heads=3"):
        RelativeMultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="dim must be even"):
        RelativeMultiHeadAttention(9, 3, 4)
    layer = RelativeMultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 8\)"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="memory must be"):
        layer(torch.randn(2, 3, 8), torch.randn(1, 3, 8))
