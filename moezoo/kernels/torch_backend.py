"""The PyTorch expert computation: sort assignments by expert, then every expert's MLP on its rows.

Always correct, on any device and float dtype. Two ways to run it:

* CUDA bf16 on Hopper/Blackwell (:func:`grouped_mm_available`): one ``torch._grouped_mm`` per
  projection over all expert-sorted rows, autograd for the backward, no host synchronisation.
* Everywhere else, :class:`_ExpertMLP`: the rows gathered once in expert order, one expert at a
  time over its slice of them, one scatter back; forward and a hand-written backward. Every
  gradient is one buffer that the per-expert GEMMs write into (autograd through per-expert slices
  would instead give each expert a full-size zero gradient of ``x`` and of the weight stack).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moezoo.kernels.activations import get_activation
from moezoo.kernels.sorting import sort_by_expert

__all__ = ["expert_mlp_torch", "grouped_mm_available"]


def grouped_mm_available(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` is the fast path here: CUDA bf16 on compute capability 9.x or
    10.x, widths multiples of 8.

    torch's CUDA ``_grouped_mm`` runs its CUTLASS kernel only for bf16 on major capability 9 or 10
    (``_grouped_mm_cuda`` in aten/src/ATen/native/cuda/GroupedBlas.cpp gates it on
    ``_scaled_mm_allowed_device(sm90_only, sm100_only)``). Elsewhere, sm80 included, it still runs,
    but as a loop of ``mm`` over the groups after copying the offsets to the host, which is what
    :class:`_ExpertMLP` does too (which of the two is faster on sm80: not measured). On the CPU
    ``_grouped_mm`` is that same loop, without fp64, and :class:`_ExpertMLP` measured at least as
    fast (benchmarks/moe_layer.py).
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    # _grouped_mm needs every row stride to be a multiple of 16 bytes (8 bf16 values); others use the loop.
    if x.shape[-1] % 8 or weight.shape[-1] % 8 or weight.shape[-2] % 8:
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


# Each activation and its derivative as torch's own kernels writing into ``out`` (which may be the
# gradient's own buffer), for the hand-written backward of _ExpertMLP.
_ACTIVATION_OUT = {
    "gelu": (
        lambda z, out: torch.ops.aten.gelu.out(z, out=out),
        lambda grad, z, out: torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=out),
    ),
    "gelu_tanh": (
        lambda z, out: torch.ops.aten.gelu.out(z, approximate="tanh", out=out),
        lambda grad, z, out: torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="tanh", grad_input=out),
    ),
    "silu": (
        lambda z, out: torch.ops.aten.silu.out(z, out=out),
        lambda grad, z, out: torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out),
    ),
    "relu": (
        lambda z, out: torch.clamp_min(z, 0, out=out),
        lambda grad, z, out: torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=out),
    ),
    "identity": (lambda z, out: out.copy_(z), lambda grad, z, out: out.copy_(grad)),
}


def _hidden(z: Tensor, activation: str, gated: bool) -> Tensor:
    """A new (n, hidden) tensor ``act(z)``, or ``act(g) * u`` with ``[g | u] = z`` when gated."""
    act_out = _ACTIVATION_OUT[activation][0]
    if not gated:
        return act_out(z, torch.empty_like(z))
    gate, up = z.chunk(2, dim=-1)
    return act_out(gate, z.new_empty(up.shape)).mul_(up)


def _hidden_backward(grad: Tensor, z: Tensor, activation: str, gated: bool) -> Tensor:
    """d loss / d z from d loss / d hidden; ``grad`` (n, hidden) is consumed (overwritten)."""
    act_out, act_grad_out = _ACTIVATION_OUT[activation]
    if not gated:
        return act_grad_out(grad, z, grad)
    gate, up = z.chunk(2, dim=-1)
    grad_z = torch.empty_like(z)
    grad_gate, grad_up = grad_z.chunk(2, dim=-1)
    act_out(gate, grad_up).mul_(grad)
    torch.mul(grad, up, out=grad_gate)
    act_grad_out(grad_gate, gate, grad_gate)
    return grad_z


def _linear(a: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    return torch.mm(a, w, out=out) if b is None else torch.addmm(b, a, w, out=out)


class _ExpertMLP(torch.autograd.Function):
    """``out[t] = sum_a weight[a] * mlp_{e_a}(x[t])`` over assignments sorted by expert.

    Between forward and backward it keeps only the pre-activations ``z`` (A, W) (and dropout
    masks): ``x`` rows are gathered again, the hidden activation is recomputed from ``z``, and the
    combine weight's gradient ``<dout[t], y_a>`` is taken as ``<dout[t] @ w_out[e]^T, h_a> +
    <dout[t], b_out[e]>``, so the expert outputs ``y`` are never stored (as in the Triton backend).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor | None,
                b_out: Tensor | None, token: Tensor, sizes: list[int], activation: str, gated: bool,
                dropout: float, for_backward: bool) -> Tensor:
        width = w_in.shape[-1]
        hidden = width // 2 if gated else width
        dim_out = hidden if w_out is None else w_out.shape[-1]
        # Without a backward to come (inference), each expert's pre-activations are a temporary.
        z_all = x.new_empty(token.numel(), width) if for_backward else None
        # Dropout keeps (bool) for the hidden activation and the expert output, drawn in forward.
        keep = None
        if dropout > 0:
            keep = [torch.empty(token.numel(), n, dtype=torch.bool, device=x.device).bernoulli_(1 - dropout)
                    for n in (hidden, dim_out)]
        scale = 1.0 / (1.0 - dropout)
        # One gather and one scatter for all experts: each CPU index_add_ call costs a near-fixed
        # ~15 ms at 4096 x 512 (benchmarks/moe_layer.py), so per-expert scatters dominated at E=64.
        xs = x.index_select(0, token)
        ys = x.new_empty(token.numel(), dim_out)
        start = 0
        for e, n in enumerate(sizes):
            rows = slice(start, start + n)
            start += n
            if n == 0:
                continue
            z = _linear(xs[rows], w_in[e], None if b_in is None else b_in[e],
                        out=None if z_all is None else z_all[rows])
            y = _hidden(z, activation, gated)
            if keep is not None:
                y.mul_(keep[0][rows]).mul_(scale)
            if w_out is not None:
                y = _linear(y, w_out[e], None if b_out is None else b_out[e])
            if keep is not None:
                y.mul_(keep[1][rows]).mul_(scale)
            torch.mul(y, weight[rows].unsqueeze(1), out=ys[rows])
        out = x.new_zeros(x.shape[0], dim_out).index_add_(0, token, ys)
        ctx.save_for_backward(x, weight, w_in, b_in, w_out, b_out, token, z_all,
                              *(keep if keep is not None else ()))
        ctx.spec = sizes, activation, gated, dropout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, w_in, b_in, w_out, b_out, token, z_all, *keep = ctx.saved_tensors
        sizes, activation, gated, dropout = ctx.spec
        need_x, need_weight, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:6]
        need_z = need_x or need_w_in or need_b_in
        scale = 1.0 / (1.0 - dropout)
        # Gathered and scattered once for all experts, as in forward.
        g_ys = grad_out.index_select(0, token)  # d loss / d (weight * y) per assignment
        xs = x.index_select(0, token) if need_w_in else None
        g_xs = x.new_empty(token.numel(), x.shape[1]) if need_x else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_w_in = torch.empty_like(w_in) if need_w_in else None
        grad_b_in = torch.empty_like(b_in) if need_b_in else None
        grad_w_out = torch.empty_like(w_out) if need_w_out else None
        grad_b_out = torch.empty_like(b_out) if need_b_out else None
        start = 0
        for e, n in enumerate(sizes):
            rows = slice(start, start + n)
            start += n
            if n == 0:
                for g in (grad_w_in, grad_b_in, grad_w_out, grad_b_out):
                    if g is not None:
                        g[e].zero_()
                continue
            z = z_all[rows]
            h = _hidden(z, activation, gated)
            if keep:
                h.mul_(keep[0][rows]).mul_(scale)
            g_y = g_ys[rows]
            if keep:
                g_y.mul_(keep[1][rows]).mul_(scale)
            w = weight[rows].unsqueeze(1)
            if w_out is None:
                if need_weight:
                    grad_weight[rows] = torch.linalg.vecdot(g_y, h)
                g_h = g_y.mul_(w)
            else:
                g_h = g_y @ w_out[e].t()  # unweighted d loss / d h
                if need_weight:
                    grad_weight[rows] = torch.linalg.vecdot(g_h, h)
                    if b_out is not None:
                        grad_weight[rows] += g_y @ b_out[e]
                if need_w_out or need_b_out:
                    g_y.mul_(w)
                    if need_w_out:
                        torch.mm(h.t(), g_y, out=grad_w_out[e])
                    if need_b_out:
                        torch.sum(g_y, 0, out=grad_b_out[e])
                g_h.mul_(w)
            if not need_z:
                continue
            if keep:
                g_h.mul_(keep[0][rows]).mul_(scale)
            g_z = _hidden_backward(g_h, z, activation, gated)
            if need_w_in:
                torch.mm(xs[rows].t(), g_z, out=grad_w_in[e])
            if need_b_in:
                torch.sum(g_z, 0, out=grad_b_in[e])
            if need_x:
                torch.mm(g_z, w_in[e].t(), out=g_xs[rows])
        grad_x = torch.zeros_like(x).index_add_(0, token, g_xs) if need_x else None
        return grad_x, grad_weight, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None, None, None, None


def _grouped_mm_expert_mlp(x: Tensor, tok: Tensor, wgt: Tensor, counts: Tensor, offsets: Tensor, w_in: Tensor,
                           w_out: Tensor | None, activation: str, b_in: Tensor | None, b_out: Tensor | None,
                           gated: bool, dropout: float) -> Tensor:
    """The expert MLP as one ``torch._grouped_mm`` per projection over the sorted rows; autograd backward."""
    offs = offsets[1:].to(torch.int32)

    def project(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        y = torch._grouped_mm(a, w, offs=offs)
        return y if b is None else y + b.repeat_interleave(counts, dim=0, output_size=a.shape[0])

    act = get_activation(activation)
    h = project(x.index_select(0, tok), w_in, b_in)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    y = F.dropout(h, dropout) if dropout > 0 else h
    if w_out is not None:
        y = project(y, w_out, b_out)
    if dropout > 0:
        y = F.dropout(y, dropout)
    return x.new_zeros(x.shape[0], y.shape[-1]).index_add_(0, tok, y * wgt.unsqueeze(1))


def expert_mlp_torch(x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, w_in: Tensor, w_out: Tensor | None,
                     activation: str = "gelu", *, b_in: Tensor | None = None, b_out: Tensor | None = None,
                     gated: bool = False, dropout: float = 0.0, training: bool = False) -> Tensor:
    """``out[t] = sum_{a: token[a]=t} weight[a] * mlp_{expert[a]}(x[t])``; see :func:`moezoo.kernels.expert_mlp`.

    Shapes: x (tokens, dim); token, expert, weight (A,); w_in (E, dim, W); w_out (E, hidden, dim_out)
    or None; returns (tokens, dim_out), or (tokens, hidden) without ``w_out``. Expert dropout (while
    ``training``) applies to the hidden activation and to the expert output. Differentiable once
    (no double backward) outside the ``torch._grouped_mm`` path.
    """
    get_activation(activation)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    order, counts, offsets = sort_by_expert(expert, w_in.shape[0])
    tok, wgt = token[order], weight[order].to(x.dtype)
    p = dropout if training else 0.0
    if grouped_mm_available(x, w_in):
        return _grouped_mm_expert_mlp(x, tok, wgt, counts, offsets, w_in, w_out, activation, b_in, b_out, gated, p)
    params = (x, wgt, w_in, b_in, w_out, b_out)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    return _ExpertMLP.apply(*params, tok, counts.tolist(), activation, gated, p, for_backward)
