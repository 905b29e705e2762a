"""The torch expert computation as one opaque operator, so that ``torch.compile`` keeps whole graphs.

The torch backend loops over the experts with a host-side count per expert (``tolist``): dynamo
cannot trace that loop (its length and slices depend on the data), and every MoE layer would break
the graph twice. Registered as a custom operator with a fake (shape-only) implementation, the
expert computation is one node of the graph whose output shape, (tokens, dim_out), is known
without running it; the loop runs eagerly inside the node. The backward is a second operator that
recomputes the forward under autograd (one more expert forward per backward, no saved
activations) and differentiates it, so the gradients are the eager backend's own.

Used by :func:`moezoo.kernels.expert_mlp` only while dynamo compiles, and not for expert dropout
in training (its mask would differ between the forward and the recomputation).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from moezoo.kernels.torch_backend import expert_mlp_torch

__all__ = ["expert_mlp_op"]


def _width(w_in: Tensor, w_out: Tensor | None, gated: bool) -> int:
    return w_out.shape[-1] if w_out is not None else w_in.shape[-1] // (2 if gated else 1)


@torch.library.custom_op("moezoo::expert_mlp", mutates_args=())
def expert_mlp_op(x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, w_in: Tensor, w_out: Tensor | None,
                  b_in: Tensor | None, b_out: Tensor | None, activation: str, gated: bool) -> Tensor:
    """:func:`~moezoo.kernels.torch_backend.expert_mlp_torch` (no dropout): x (tokens, dim), token/expert/weight
    (A,), w_in (E, dim, width), w_out (E, hidden, dim_out) or None -> (tokens, dim_out)."""
    return expert_mlp_torch(x, token, expert, weight, w_in, w_out, activation, b_in=b_in, b_out=b_out, gated=gated)


@expert_mlp_op.register_fake
def _expert_mlp_fake(x, token, expert, weight, w_in, w_out, b_in, b_out, activation, gated):
    return x.new_empty(x.shape[0], _width(w_in, w_out, gated))


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd inside an operator's implementation: the dispatcher runs it below autograd (the
    autograd keys excluded), so grad mode alone records nothing; this lifts that exclusion."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(keys.AutogradFunctionality).remove(keys.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("moezoo::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward(grad: Tensor, x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, w_in: Tensor,
                         w_out: Tensor | None, b_in: Tensor | None, b_out: Tensor | None, activation: str,
                         gated: bool) -> list[Tensor]:
    """Gradients of :func:`expert_mlp_op` for x, weight, w_in and those of w_out, b_in, b_out given."""
    inputs = [t.detach().requires_grad_() for t in (x, weight, w_in, w_out, b_in, b_out) if t is not None]
    x_, weight_, w_in_, *rest = inputs
    present = iter(rest)
    w_out_, b_in_, b_out_ = (None if t is None else next(present) for t in (w_out, b_in, b_out))
    with _autograd_enabled():
        out = expert_mlp_torch(x_, token, expert, weight_, w_in_, w_out_, activation, b_in=b_in_, b_out=b_out_,
                               gated=gated)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


@_expert_mlp_backward.register_fake
def _expert_mlp_backward_fake(grad, x, token, expert, weight, w_in, w_out, b_in, b_out, activation, gated):
    return [torch.empty_like(t) for t in (x, weight, w_in, w_out, b_in, b_out) if t is not None]


def _setup_context(ctx, inputs, output) -> None:
    x, token, expert, weight, w_in, w_out, b_in, b_out, activation, gated = inputs
    ctx.save_for_backward(x, token, expert, weight, w_in, w_out, b_in, b_out)
    ctx.activation, ctx.gated = activation, gated


def _backward(ctx, grad: Tensor):
    x, token, expert, weight, w_in, w_out, b_in, b_out = ctx.saved_tensors
    grads = iter(_expert_mlp_backward(grad.contiguous(), x, token, expert, weight, w_in, w_out, b_in, b_out,
                                      ctx.activation, ctx.gated))
    d_x, d_weight, d_w_in = next(grads), next(grads), next(grads)
    d_w_out, d_b_in, d_b_out = (None if t is None else next(grads) for t in (w_out, b_in, b_out))
    return d_x, None, None, d_weight, d_w_in, d_w_out, d_b_in, d_b_out, None, None


expert_mlp_op.register_autograd(_backward, setup_context=_setup_context)
