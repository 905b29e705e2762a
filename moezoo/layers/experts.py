"""Expert banks: the one seam between routing and the expert computation.

A bank holds E experts' weights stacked on dim 0 and is called as ``bank(x, routing) -> (tokens,
dim_out)``. It alone decides how the assignments reach the expert weights:

- the **dispatcher**: :class:`LocalDispatcher` (all experts here), or the all-to-all expert-parallel
  one of :mod:`moezoo.layers.expert_parallel`, which sends each assignment to the rank that holds
  its expert and the result back;
- the **backend** (``"auto"``, ``"torch"``, ``"triton"``; :func:`moezoo.kernels.resolve_backend`);
- the **compute dtype**: the autocast dtype under autocast, as ``nn.Linear``; with
  ``bfloat16_dispatch`` the expert inputs and outputs are rounded to bf16 while routing, combine
  weights and the combine sum stay fp32 (vmoe's ``dispatcher.bfloat16``).

It also owns the expert count: ``num_experts`` is the global E that routings are over;
``expert_start`` and ``num_local_experts`` say which contiguous shard of them this module's
parameters hold (all of them unless the bank was sharded). Layers route and call the bank; they
never branch on parallelism or backend.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.kernels import BACKENDS, expert_linear, expert_mlp, get_activation
from moezoo.routers.routing import Routing

__all__ = ["Dispatcher", "ExpertBank", "Experts", "LinearExperts", "LocalDispatcher", "combine_rows", "round_to_bfloat16"]


def round_to_bfloat16(x: Tensor) -> Tensor:
    """x rounded to the nearest bf16 value (ties to even), kept in x's dtype (the gradient is rounded
    the same way, as the transpose of a cast)."""
    return x.to(torch.bfloat16).to(x.dtype)


def combine_rows(rows: Tensor, token: Tensor, weight: Tensor, num_tokens: int) -> Tensor:
    """``out[t] = sum over rows r of token t: weight[r] * rows[r]``.

    Args:
        rows: (A, dim_out) unweighted expert outputs, one per assignment.
        token: (A,) the token of each row.
        weight: (A,) combine weights.
        num_tokens: T.

    Returns:
        (T, dim_out) in rows' dtype; tokens without rows are zero.
    """
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add_(0, token, rows * weight.to(rows.dtype).unsqueeze(1))


class Dispatcher(abc.ABC):
    """How a bank's assignments reach its expert weights: ``dispatcher(x, routing, bank) -> (tokens, dim_out)``."""

    @abc.abstractmethod
    def __call__(self, x: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
        """x: (tokens, d_in), routing over the bank's E experts -> (tokens, d_out)."""

    def __deepcopy__(self, memo: dict) -> Dispatcher:
        # Dispatchers hold process groups, which cannot be copied; a copied model (EMA, a
        # single-process reference) shares them.
        return self


class LocalDispatcher(Dispatcher):
    """Every expert is on this rank: one fused, weighted expert computation over all assignments."""

    def __call__(self, x: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
        if not bank.bfloat16_dispatch:
            return bank.compute(x, routing)
        rows = round_to_bfloat16(x).index_select(0, routing.token)
        out_rows = round_to_bfloat16(bank.compute_rows(rows, routing.expert))
        return combine_rows(out_rows.float(), routing.token, routing.weight, x.shape[0]).to(out_rows.dtype)


class ExpertBank(nn.Module, abc.ABC):
    """Base of the expert banks; ``forward(x: (tokens, d_in), routing) -> (tokens, d_out)``.

    Subclasses register the stacked expert parameters (every parameter of a bank is stacked on
    dim 0, one slice per expert) and implement :meth:`compute`.

    Args:
        num_experts: E, the global expert count routings are over.
        backend: "auto", "torch" or "triton".
        bfloat16_dispatch: round expert inputs and outputs to bf16 (vmoe's ``dispatcher.bfloat16``).
    """

    def __init__(self, num_experts: int, *, backend: str = "auto", bfloat16_dispatch: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_experts = require_int(name, "num_experts", num_experts)
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.bfloat16_dispatch = bool(bfloat16_dispatch)
        self.expert_start = 0
        self.num_local_experts = num_experts
        self.dispatcher: Dispatcher = LocalDispatcher()

    @property
    def sharded(self) -> bool:
        """Whether this module holds only a shard of the experts."""
        return self.num_local_experts != self.num_experts

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: (tokens, d_in) and a routing over all E experts -> (tokens, d_out)."""
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"{type(self).__name__}: routing is over {routing.num_experts} experts but the bank has "
                f"num_experts={self.num_experts}"
            )
        return self.dispatcher(x, routing, self)

    @abc.abstractmethod
    def compute(self, x: Tensor, routing: Routing) -> Tensor:
        """The weighted expert computation over this module's experts.

        Args:
            x: (rows, d_in).
            routing: assignments over ``rows`` rows and the ``num_local_experts`` local experts.

        Returns:
            (rows, d_out).
        """

    def compute_rows(self, rows: Tensor, expert: Tensor) -> Tensor:
        """Unweighted outputs, one per row: rows (A, d_in), expert (A,) local indices -> (A, d_out)."""
        count = rows.shape[0]
        arange = torch.arange(count, device=rows.device)
        ones = torch.ones(count, device=rows.device, dtype=torch.float32)
        return self.compute(rows, Routing(arange, expert, ones, count, self.num_local_experts))

    @torch.no_grad()
    def keep_experts(self, start: int, count: int, dispatcher: Dispatcher) -> list[str]:
        """Keep only experts ``[start, start + count)`` (a shard) and route through ``dispatcher``.

        Returns:
            The names (relative to the bank) of the parameters now holding a shard.
        """
        if self.sharded:
            raise ValueError(f"{type(self).__name__}: the experts are already sharded")
        names = []
        for name, param in list(self.named_parameters(recurse=False)):
            shard = nn.Parameter(param[start : start + count].clone(), requires_grad=param.requires_grad)
            setattr(self, name, shard)
            names.append(name)
        self.expert_start, self.num_local_experts, self.dispatcher = start, count, dispatcher
        return names


class Experts(ExpertBank):
    """E expert MLPs ``mlp_e(v) = act(v @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated: ``act(g) * u``).

    Parameters: ``w_in`` (E, dim, hidden or 2*hidden) with ``[gate | up]`` halves when gated,
    ``b_in`` (E, width), ``w_out`` (E, hidden, dim), ``b_out`` (E, dim). Every MoE-style layer holds
    its experts in one of these, so there is one expert computation, one initialisation and one
    dense-to-expert copy.

    Args:
        dim: input and output width.
        hidden: hidden width of each expert.
        num_experts: E.
        activation: "gelu", "gelu_tanh", "silu" or "relu".
        gated: gated (GLU) experts; SwiGLU with "silu".
        bias: biases in both projections.
        dropout: expert dropout (hidden activation and output), training only.
        identical_init: every expert starts as a copy of expert 0.
        backend: "auto", "torch" or "triton".
        bfloat16_dispatch: see :class:`ExpertBank`.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, activation: str = "gelu", *, gated: bool = False,
                 bias: bool = True, dropout: float = 0.0, identical_init: bool = False, backend: str = "auto",
                 bfloat16_dispatch: bool = False) -> None:
        super().__init__(num_experts, backend=backend, bfloat16_dispatch=bfloat16_dispatch)
        self.dim = require_int("Experts", "dim", dim)
        self.hidden = require_int("Experts", "hidden", hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Experts: dropout must be in [0, 1), got {dropout}")
        get_activation(activation)
        self.activation, self.gated, self.dropout = activation, gated, dropout
        width = hidden * (2 if gated else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.identical_init = identical_init
        self.reset_parameters()

    def extra_repr(self) -> str:
        local = f", local={self.expert_start}..{self.expert_start + self.num_local_experts - 1}" if self.sharded else ""
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}{local}, "
            f"activation={self.activation}, gated={self.gated}, backend={self.backend}"
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert as ``nn.Linear`` initialises itself: U(±1/sqrt(fan_in)) weights and biases."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)
        if self.identical_init:
            self.copy_expert_to_all(0)

    @torch.no_grad()
    def copy_expert_to_all(self, index: int) -> None:
        """Make every expert a copy of expert ``index``."""
        for p in (self.w_in, self.w_out, self.b_in, self.b_out):
            if p is not None:
                p.copy_(p[index : index + 1].expand_as(p))

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Copy a dense MLP's two ``nn.Linear`` layers into every expert (sparse upcycling)."""
        if fc1.weight.shape != (self.w_in.shape[2], self.dim) or fc2.weight.shape != (self.dim, self.hidden):
            raise ValueError(
                f"load_dense: fc1 {tuple(fc1.weight.shape)} / fc2 {tuple(fc2.weight.shape)} do not match "
                f"experts of dim={self.dim}, hidden={self.hidden}, gated={self.gated}"
            )
        if (fc1.bias is None) != (self.b_in is None) or (fc2.bias is None) != (self.b_out is None):
            raise ValueError("load_dense: the dense MLP and the experts disagree on biases")
        self.w_in.copy_(fc1.weight.t().unsqueeze(0).expand_as(self.w_in))
        self.w_out.copy_(fc2.weight.t().unsqueeze(0).expand_as(self.w_out))
        if self.b_in is not None:
            self.b_in.copy_(fc1.bias.unsqueeze(0).expand_as(self.b_in))
            self.b_out.copy_(fc2.bias.unsqueeze(0).expand_as(self.b_out))

    def compute(self, x: Tensor, routing: Routing) -> Tensor:
        """x: (rows, dim) -> (rows, dim), the routing-weighted sum of the local experts' outputs."""
        return expert_mlp(
            x, routing, self.w_in, self.w_out, self.activation, b_in=self.b_in, b_out=self.b_out,
            gated=self.gated, dropout=self.dropout, training=self.training, backend=self.backend,
        )


class LinearExperts(ExpertBank):
    """E linear experts ``v @ weight[e] + bias[e]``: the expert projections of attention layers
    (MoA's per-expert query and output projections, SwitchHead's value and output projections).

    Parameters: ``weight`` (E, d_in, d_out), ``bias`` (E, d_out) when ``bias``.

    Args:
        d_in: input width.
        d_out: output width.
        num_experts: E.
        bias: a bias per expert.
        backend: "auto", "torch" or "triton" (single projections run on the torch path).
        bfloat16_dispatch: see :class:`ExpertBank`.
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, *, bias: bool = False, backend: str = "auto",
                 bfloat16_dispatch: bool = False) -> None:
        super().__init__(num_experts, backend=backend, bfloat16_dispatch=bfloat16_dispatch)
        self.d_in = require_int("LinearExperts", "d_in", d_in)
        self.d_out = require_int("LinearExperts", "d_out", d_out)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(num_experts, d_out)) if bias else None
        nn.init.normal_(self.weight, 0.0, d_in ** -0.5)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, num_experts={self.num_experts}"

    def compute(self, x: Tensor, routing: Routing) -> Tensor:
        """x: (rows, d_in) -> (rows, d_out), the routing-weighted sum of the local experts' outputs."""
        return expert_linear(x, routing, self.weight, bias=self.bias, backend=self.backend)
