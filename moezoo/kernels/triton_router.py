"""Triton routing helpers: fused score + top-k router kernel and a host-sync-free sort by expert.

``fused_topk_routing`` replaces the chain ``softmax/sigmoid -> sort -> slice -> renormalise`` of
:func:`moezoo.routers.functional.top_k` by one kernel with one program per block of tokens. The
forward pass is the torch math in fp32; the gradient w.r.t. the logits is the torch formula,
recomputed in ``backward`` (routing is a tiny part of an MoE layer's cost, so a dedicated backward
kernel is not worth its code).

``sort_by_expert`` is the bookkeeping every grouped GEMM needs (which sorted rows belong to which
expert), built only from device-side ops so a CUDA stream never waits for the host.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from moezoo.routers.functional import top_k

__all__ = ["INTERPRET", "fused_topk_routing", "sort_by_expert", "topk_routing_torch"]

# triton.jit picks the interpreter when the kernels below are decorated, i.e. at import time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
SCORES = ("softmax", "sigmoid")
_BLOCK_T = 16 if INTERPRET else 64  # tokens per program; E_POW2 columns each
_WARNED: set[str] = set()


def sort_by_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of assignments by expert, with per-expert counts and offsets, without host sync.

    ``torch.bincount`` reads the maximum back to the host on CUDA, so counts come from
    ``searchsorted`` on the sorted experts instead (no atomics, deterministic).

    Args:
        expert: (A,) int64 expert of each assignment, in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        order: (A,) int64, assignment index of each sorted position (stable: ties keep input order).
        counts: (E,) int64 assignments per expert.
        offsets: (E + 1,) int64, ``offsets[e]`` is the first sorted position of expert e and
            ``offsets[E] == A``.
    """
    order = torch.argsort(expert, stable=True)
    bounds = torch.arange(num_experts + 1, device=expert.device, dtype=expert.dtype)
    offsets = torch.searchsorted(expert[order], bounds)
    return order, offsets.diff(), offsets


def topk_routing_torch(
    logits: Tensor, k: int, score: str = "softmax", normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """The reference math of :func:`fused_topk_routing` in plain torch (fp32, autograd)."""
    probs = torch.softmax(logits.float(), dim=-1) if score == "softmax" else torch.sigmoid(logits.float())
    values, index = top_k(probs, k)
    if normalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, index


@triton.jit
def _topk_routing_kernel(
    logits_ptr, stride_lt, stride_le,
    weights_ptr, indices_ptr,  # (T, K) each, contiguous
    T, E,
    K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_POW2)
    row_ok = rows < T
    col_ok = cols[None, :] < E
    # Rows past T read zeros (not -inf) so their softmax stays finite; they are never stored.
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
    if SIGMOID:
        probs = tl.sigmoid(logits)
    else:
        logits = tl.where(col_ok, logits, float("-inf"))
        unnorm = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = unnorm / tl.sum(unnorm, axis=1)[:, None]
    # Padding columns and already chosen experts are -inf, below every probability.
    probs = tl.where(col_ok, probs, float("-inf"))

    slots = tl.arange(0, K_POW2)[None, :]
    values = tl.zeros((BLOCK_T, K_POW2), tl.float32)
    index = tl.zeros((BLOCK_T, K_POW2), tl.int64)
    for i in tl.static_range(K):
        best = tl.max(probs, axis=1)
        # Ties go to the lowest expert index, as the stable descending sort of ``top_k``.
        choice = tl.min(tl.where(probs == best[:, None], cols[None, :], E_POW2), axis=1)
        values = tl.where(slots == i, best[:, None], values)
        index = tl.where(slots == i, choice[:, None].to(tl.int64), index)
        probs = tl.where(cols[None, :] == choice[:, None], float("-inf"), probs)
    if NORMALIZE:
        values = values / tl.sum(values, axis=1)[:, None]

    out = rows.to(tl.int64)[:, None] * K + slots
    out_ok = row_ok[:, None] & (slots < K)
    tl.store(weights_ptr + out, values, mask=out_ok)
    tl.store(indices_ptr + out, index, mask=out_ok)


class _FusedTopKRouting(torch.autograd.Function):
    """Kernel forward; backward re-runs the torch math on the saved logits and chosen indices."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int, score: str, normalize: bool) -> tuple[Tensor, Tensor]:
        tokens, experts = logits.shape
        weights = torch.empty(tokens, k, device=logits.device, dtype=torch.float32)
        indices = torch.empty(tokens, k, device=logits.device, dtype=torch.int64)
        if tokens:
            _topk_routing_kernel[(triton.cdiv(tokens, _BLOCK_T),)](
                logits, logits.stride(0), logits.stride(1), weights, indices, tokens, experts,
                K=k, K_POW2=triton.next_power_of_2(k), E_POW2=triton.next_power_of_2(experts),
                BLOCK_T=_BLOCK_T, SIGMOID=score == "sigmoid", NORMALIZE=normalize,
            )
        ctx.save_for_backward(logits, indices)
        ctx.score, ctx.normalize = score, normalize
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, grad_weights: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        logits, indices = ctx.saved_tensors
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            probs = torch.softmax(leaf.float(), dim=-1) if ctx.score == "softmax" else torch.sigmoid(leaf.float())
            values = probs.gather(1, indices)
            if ctx.normalize:
                values = values / values.sum(dim=-1, keepdim=True)
            (grad_logits,) = torch.autograd.grad(values, leaf, grad_weights)
        return grad_logits, None, None, None


def fused_topk_routing(
    logits: Tensor, k: int, score: str = "softmax", normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Scores over experts, then the top k per token, in one Triton kernel.

    Args:
        logits: (T, E) router logits, any float dtype (the math runs in fp32).
        k: experts per token, ``1 <= k <= E``.
        score: "softmax" over experts or elementwise "sigmoid".
        normalize: divide the k chosen scores by their sum.

    Returns:
        weights: (T, k) fp32 scores of the chosen experts, highest first (differentiable).
        indices: (T, k) int64 chosen experts; ties go to the lower index, as
            :func:`moezoo.routers.functional.top_k`.

    Tensors the kernel cannot run on (not CUDA without ``TRITON_INTERPRET=1``, or not float) use
    :func:`topk_routing_torch`, with a one-time warning.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (tokens, experts), got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, num_experts={logits.shape[1]}], got k={k}")
    reason = None
    if not (logits.is_cuda or INTERPRET):
        reason = f"logits on {logits.device} need CUDA (or TRITON_INTERPRET=1)"
    elif logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reason = f"dtype {logits.dtype} is not supported"
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"fused_topk_routing: {reason}; using the torch implementation", stacklevel=2)
        return topk_routing_torch(logits, k, score, normalize)
    return _FusedTopKRouting.apply(logits, k, score, normalize)
