"""The expert computation shared by every MoE layer: one entry point, several backends.

``expert_mlp(x, routing, w_in, w_out, activation)`` computes, for every token t,
``sum over assignments a of t: weight[a] * mlp_{expert[a]}(x[t])`` with
``mlp_e(v) = act(v @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated: ``act(g) * u`` where
``[g | u] = v @ w_in[e] + b_in[e]``, i.e. SwiGLU with ``activation="silu"``).
"""

from __future__ import annotations

from torch import Tensor

from moezoo.kernels.activations import ACTIVATIONS, get_activation
from moezoo.kernels.torch_backend import expert_mlp_torch
from moezoo.routers.routing import Routing

__all__ = ["ACTIVATIONS", "BACKENDS", "expert_linear", "expert_mlp", "get_activation", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will run: ``"auto"`` is triton on CUDA tensors, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_importable() else "torch"
    return backend


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
        backend: "auto", "torch" or "triton".

    Returns:
        (tokens, dim_out); rows with no assignment are zero.
    """
    _check_shapes(x, routing, w_in, w_out, gated, b_in, b_out)
    get_activation(activation)
    chosen = resolve_backend(backend, x)
    if chosen == "triton" and w_out is None:
        chosen = "torch"  # the Triton kernels fuse two projections; a single one runs on the torch path
    if chosen == "triton":
        from moezoo.kernels.triton_backend import expert_mlp_triton

        return expert_mlp_triton(
            x, routing.token, routing.expert, routing.weight, w_in, w_out, activation,
            b_in=b_in, b_out=b_out, gated=gated, dropout=dropout, training=training,
        )
    return expert_mlp_torch(
        x, routing.token, routing.expert, routing.weight, w_in, w_out, activation,
        b_in=b_in, b_out=b_out, gated=gated, dropout=dropout, training=training,
    )


def expert_linear(x: Tensor, routing: Routing, weight: Tensor, *, bias: Tensor | None = None,
                  backend: str = "auto") -> Tensor:
    """Linear experts: ``out[t] = sum over assignments a of t: weight_a * (x[t] @ weight[e_a] + bias[e_a])``.

    The expert computation of attention experts (MoA's query/output projections, SwitchHead's
    value/output projections): :func:`expert_mlp` with one projection and no activation.

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
