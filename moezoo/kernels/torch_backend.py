"""The PyTorch expert computation: sort assignments by expert, grouped GEMMs, weighted scatter-add.

Always correct, on any device and dtype; autograd does the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.kernels.activations import get_activation

__all__ = ["expert_mlp_torch", "grouped_mm_available"]


def grouped_mm_available(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` is the fast path here: CUDA bf16 on sm90+ (Hopper).

    On the CPU the per-expert loop is faster than ``torch._grouped_mm`` (measured: 0.12 s vs 0.17 s
    for 8 experts x 1024 tokens x 512 -> 2048 in fp32, torch 2.14), so the loop is used there.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor, splits: list[int] | None) -> Tensor:
    """Rows of x sorted by expert times their expert's weight: x (A, in), weight (E, in, out) -> (A, out)."""
    if splits is None:
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = torch._grouped_mm(x, weight, offs=offsets)
        if bias is not None:
            out = out + bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
        return out
    parts = []
    for e, rows in enumerate(torch.split(x, splits)):
        if rows.shape[0] == 0:
            continue
        parts.append(rows @ weight[e] if bias is None else torch.addmm(bias[e], rows, weight[e]))
    if not parts:
        return x.new_zeros(0, weight.shape[-1])
    return torch.cat(parts)


def expert_mlp_torch(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str = "gelu",
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    gated: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``out[t] = sum_{a: token[a]=t} weight[a] * mlp_{expert[a]}(x[t])``; see :func:`moezoo.kernels.expert_mlp`."""
    act = get_activation(activation)
    num_experts = w_in.shape[0]
    order = torch.argsort(expert, stable=True)
    tok, exp, wgt = token[order], expert[order], weight[order]
    counts = torch.bincount(exp, minlength=num_experts)
    splits = None if grouped_mm_available(x, w_in) else counts.tolist()

    rows = x.index_select(0, tok)  # (A, dim)
    h = _grouped_linear(rows, w_in, b_in, counts, splits)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    if dropout > 0:
        h = F.dropout(h, dropout, training)
    y = _grouped_linear(h, w_out, b_out, counts, splits)
    if dropout > 0:
        y = F.dropout(y, dropout, training)
    y = y * wgt.to(y.dtype).unsqueeze(1)
    out = x.new_zeros(x.shape[0], w_out.shape[-1])
    return out.index_add(0, tok, y)
