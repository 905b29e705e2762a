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
    """Whether ``torch._grouped_mm`` is the fast path here: CUDA bf16 on sm90+ (Hopper), widths
    multiples of 8.

    On the CPU the per-expert loop is faster than ``torch._grouped_mm`` (measured: 0.12 s vs 0.17 s
    for 8 experts x 1024 tokens x 512 -> 2048 in fp32, torch 2.14), so the loop is used there.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    # _grouped_mm needs every row stride to be a multiple of 16 bytes (8 bf16 values); others use the loop.
    if x.shape[-1] % 8 or weight.shape[-1] % 8 or weight.shape[-2] % 8:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _expert_hidden(h: Tensor, act, gated: bool, dropout: float, training: bool) -> Tensor:
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return F.dropout(h, dropout, training) if dropout > 0 else h


def expert_mlp_torch(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor | None,
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
    tok, wgt = token[order], weight[order].to(x.dtype)
    counts = torch.bincount(expert[order], minlength=num_experts)
    width = w_in.shape[-1] // (2 if gated else 1) if w_out is None else w_out.shape[-1]
    out = x.new_zeros(x.shape[0], width)

    if grouped_mm_available(x, w_in):
        # One grouped GEMM per projection over the expert-sorted rows, no host synchronisation.
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        rows = x.index_select(0, tok)
        h = torch._grouped_mm(rows, w_in, offs=offsets)
        if b_in is not None:
            h = h + b_in.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
        y = _expert_hidden(h, act, gated, dropout, training)
        if w_out is not None:
            y = torch._grouped_mm(y, w_out, offs=offsets)
        if b_out is not None:
            y = y + b_out.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
        if dropout > 0:
            y = F.dropout(y, dropout, training)
        return out.index_add_(0, tok, y * wgt.unsqueeze(1))

    # Elsewhere one expert at a time over its contiguous slice of the sorted assignments: no
    # concatenated intermediates, each expert's output is scattered straight into ``out``.
    # unbind() once, not w[e] per expert: the backward of each w[e] would build a full-size
    # gradient of the whole stack (64 experts: 64 x the weight memory traffic).
    w_in_e = w_in.unbind(0)
    w_out_e = None if w_out is None else w_out.unbind(0)
    b_in_e = None if b_in is None else b_in.unbind(0)
    b_out_e = None if b_out is None else b_out.unbind(0)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows_tok = tok[start : start + n]
        rows = x.index_select(0, rows_tok)
        h = rows @ w_in_e[e] if b_in_e is None else torch.addmm(b_in_e[e], rows, w_in_e[e])
        h = _expert_hidden(h, act, gated, dropout, training)
        if w_out_e is None:
            y = h
        else:
            y = h @ w_out_e[e] if b_out_e is None else torch.addmm(b_out_e[e], h, w_out_e[e])
        if dropout > 0:
            y = F.dropout(y, dropout, training)
        out.index_add_(0, rows_tok, y * wgt[start : start + n].unsqueeze(1))
        start += n
    return out
