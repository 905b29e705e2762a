"""The expert computation shared by every MoE layer: one entry point, one backend choice, two backends.

``expert_mlp(x, routing, w_in, w_out, activation)`` computes, for every token t,
``sum over assignments a of t: weight[a] * mlp_{expert[a]}(x[t])`` with
``mlp_e(v) = act(v @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated: ``act(g) * u`` where
``[g | u] = v @ w_in[e] + b_in[e]``, i.e. SwiGLU with ``activation="silu"``).

Precision follows ``nn.Linear``: under ``torch.autocast`` the expert GEMMs run in the autocast
dtype (inputs and expert weights are cast to it, differentiably) and the output has that dtype;
outside autocast they run in the dtype of ``x`` and the weights. fp32 GEMMs follow
``torch.get_float32_matmul_precision()`` on both backends (TF32 tensor cores at "high").
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from moezoo.kernels.activations import ACTIVATIONS, get_activation
from moezoo.kernels.compiled import expert_mlp_op
from moezoo.kernels.torch_backend import expert_mlp_torch
from moezoo.routers.routing import Routing

__all__ = ["ACTIVATIONS", "BACKENDS", "expert_linear", "expert_mlp", "get_activation", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WARNED: set[str] = set()  # reasons an explicit "triton" request ran on torch, each warned once


def _triton_interpreting() -> bool | None:
    """Whether Triton runs in its CPU interpreter; None when Triton cannot be imported."""
    try:
        import triton
    except ImportError:
        return None
    return bool(triton.knobs.runtime.interpret)


def _triton_unsupported(x: Tensor, params: list[Tensor], two_projections: bool, dropout: float,
                        training: bool) -> str | None:
    """Why the Triton kernels cannot compute this call exactly, or None when they can."""
    interpreting = _triton_interpreting()
    if interpreting is None:
        return "triton is not installed"
    if not two_projections:
        return "the kernels fuse two projections; single-projection experts run on the torch path"
    if dropout > 0 and training:
        return "expert dropout is not fused into the kernels"
    if not (x.is_cuda or interpreting):
        return f"tensors on {x.device} need CUDA (or TRITON_INTERPRET=1)"
    if x.dtype not in _TRITON_DTYPES or any(p.dtype != x.dtype for p in params):
        dtypes = sorted({str(t.dtype) for t in [x, *params]})
        return f"dtypes {dtypes} of x and the expert parameters are not one and the same of fp32/fp16/bf16"
    return None


def resolve_backend(backend: str, x: Tensor, params: list[Tensor] | None = None, *, two_projections: bool = True,
                    dropout: float = 0.0, training: bool = False) -> str:
    """The backend that will run a call: the one decision of the package.

    ``"auto"`` picks Triton on CUDA wherever the kernels compute the call exactly (fp32/fp16/bf16,
    two projections, no expert dropout in training), the torch path otherwise. This rests on the
    kernels' design (no materialised gathers, fused activation, deterministic fp32 combine) and on
    ahead-of-time compilation for sm_90, not on a GPU timing: no GPU measurement exists yet
    (``benchmarks/gpu_check.sh`` records one). An explicit ``"triton"`` on a call the kernels cannot
    compute runs the torch path, with a warning once per reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        # "auto" off CUDA is always the torch path; deciding it without asking Triton keeps
        # torch.compile from breaking the graph on Triton's (untraceable) settings.
        return "torch"
    reason = _triton_unsupported(x, params or [], two_projections, dropout, training)
    if reason is None:
        return "triton" if backend == "triton" or x.is_cuda else "torch"
    if backend == "triton" and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"expert_mlp(backend='triton'): {reason}; using the torch backend", stacklevel=3)
    return "torch"


def _check_shapes(x: Tensor, routing: Routing, w_in: Tensor, w_out: Tensor | None, gated: bool,
                  b_in: Tensor | None, b_out: Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (tokens, dim), got shape {tuple(x.shape)}")
    tokens, dim = x.shape
    if routing.num_tokens != tokens:
        raise ValueError(f"routing is for {routing.num_tokens} tokens but x has {tokens} rows")
    if w_in.dim() != 3 or w_in.shape[1] != dim:
        raise ValueError(f"w_in must have shape (experts, dim={dim}, hidden), got {tuple(w_in.shape)}")
    experts, _, width = w_in.shape
    if routing.num_experts != experts:
        raise ValueError(f"routing is for {routing.num_experts} experts but w_in has {experts}")
    if gated and width % 2:
        raise ValueError(f"gated experts need an even w_in width (gate and up halves), got {width}")
    hidden = width // 2 if gated else width
    if w_out is not None and (w_out.dim() != 3 or w_out.shape[:2] != (experts, hidden)):
        raise ValueError(f"w_out must have shape (experts={experts}, hidden={hidden}, dim_out), got {tuple(w_out.shape)}")
    if b_in is not None and b_in.shape != (experts, width):
        raise ValueError(f"b_in must have shape ({experts}, {width}), got {tuple(b_in.shape)}")
    if b_out is not None and (w_out is None or b_out.shape != (experts, w_out.shape[-1])):
        raise ValueError(f"b_out must have shape (experts, dim_out) and needs w_out, got {tuple(b_out.shape)}")


def expert_mlp(
    x: Tensor,
    routing: Routing,
    w_in: Tensor,
    w_out: Tensor | None,
    activation: str = "gelu",
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    gated: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Run every routed assignment through its expert MLP and combine the weighted outputs.

    Args:
        x: (tokens, dim) input rows.
        routing: the assignments (``token``, ``expert``, ``weight``, each (A,)).
        w_in: (experts, dim, hidden), or (experts, dim, 2 * hidden) with ``gated`` ([gate | up]).
        w_out: (experts, hidden, dim_out), or None for single-projection experts
            (``act(x @ w_in[e] + b_in[e])``; see :func:`expert_linear`).
        activation: one of :data:`ACTIVATIONS`.
        b_in: optional (experts, w_in width) bias.
        b_out: optional (experts, dim_out) bias.
        gated: gated linear unit experts (SwiGLU with "silu", GEGLU with "gelu").
        dropout: expert dropout on the hidden activation and the expert output (``training`` only).
        training: whether dropout is active.
        backend: "auto", "torch" or "triton" (see :func:`resolve_backend`).

    Returns:
        (tokens, dim_out) in the autocast dtype under autocast, else in x's dtype; rows with no
        assignment are zero.
    """
    _check_shapes(x, routing, w_in, w_out, gated, b_in, b_out)
    get_activation(activation)
    params = [p for p in (w_in, w_out, b_in, b_out) if p is not None]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # As nn.Linear under autocast: the GEMMs run in the autocast dtype, and so does the output.
        dtype = torch.get_autocast_dtype(device)
        x, w_in, w_out, b_in, b_out = (None if t is None else t.to(dtype) for t in (x, w_in, w_out, b_in, b_out))
        params = [p.to(dtype) for p in params]
    chosen = resolve_backend(backend, x, params, two_projections=w_out is not None, dropout=dropout,
                             training=training)
    with torch.autocast(device, enabled=False):
        if chosen == "triton":
            from moezoo.kernels.triton_backend import expert_mlp_triton

            return expert_mlp_triton(x, routing.token, routing.expert, routing.weight, w_in, w_out, activation,
                                     b_in=b_in, b_out=b_out, gated=gated)
        if torch.compiler.is_compiling() and not (dropout > 0 and training):
            # One opaque node instead of the host-synchronising expert loop (moezoo.kernels.compiled).
            return expert_mlp_op(x, routing.token, routing.expert, routing.weight, w_in, w_out, b_in, b_out,
                                 activation, gated)
        return expert_mlp_torch(
            x, routing.token, routing.expert, routing.weight, w_in, w_out, activation,
            b_in=b_in, b_out=b_out, gated=gated, dropout=dropout, training=training,
        )


def expert_linear(x: Tensor, routing: Routing, weight: Tensor, *, bias: Tensor | None = None,
                  backend: str = "auto") -> Tensor:
    """Linear experts: ``out[t] = sum over assignments a of t: weight_a * (x[t] @ weight[e_a] + bias[e_a])``.

    :func:`expert_mlp` with one projection and no activation: the expert computation of attention
    experts (MoA's query/output projections, SwitchHead's value/output projections).

    Args:
        x: (rows, d_in).
        routing: assignments over ``rows`` rows and ``weight.shape[0]`` experts.
        weight: (experts, d_in, d_out).
        bias: optional (experts, d_out).
        backend: "auto", "torch" or "triton" (single projections run on the torch path).

    Returns:
        (rows, d_out); rows without an assignment are zero.
    """
    return expert_mlp(x, routing, weight, None, "identity", b_in=bias, backend=backend)
