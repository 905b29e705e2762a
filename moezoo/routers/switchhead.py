"""SwitchHead's per-head σ-gating (Csordás et al., arXiv 2312.07987): every head picks its own experts.

Reference: RobertCsordas/switchhead ``switchhead/switchhead.py`` (``SwitchHeadCore.get_sel`` and
``reset_parameters``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["SwitchHeadSelector", "renorm_rows_"]


@torch.no_grad()
def renorm_rows_(weight: Tensor) -> Tensor:
    """The reference's ``renorm_rows``: each row scaled to unit norm, then everything by
    ``row std / overall std`` (so rows keep their own std). In place; returns ``weight``."""
    row_std = weight.std(dim=-1, keepdim=True)
    weight.div_(weight.norm(dim=-1, keepdim=True))
    weight.mul_(row_std / weight.std())
    return weight


class SwitchHeadSelector(Router):
    """Per-head, non-competitive expert selection: ``s = sigmoid(x W_sel^T)`` viewed as
    (heads, experts); each head takes its top k by ``s`` and uses those scores as weights, not
    renormalised.

    The gate holds the reference's ``sel_v``/``sel_o`` of shape (heads * experts, dim) (row
    ``h * experts + e``). The returned :class:`Routing` is over ``tokens * heads`` rows (row
    ``t * heads + h``: token t seen by head h) and ``heads * experts`` experts (expert
    ``h * experts + e``), so one expert bank of ``heads * experts`` matrices serves all heads.

    Expert dropout, as the reference: in training each score is replaced by -inf with probability
    ``expert_dropout`` before the top-k; the weights are the undropped scores.

    Initialisation: ``N(0, (init_scale / sqrt(dim))^2)``, rows renormalised (:func:`renorm_rows_`).

    Args:
        dim: input feature size.
        num_heads: attention heads H.
        num_experts: experts per head E.
        k: experts per head and token.
        expert_dropout: see above (SwitchHead paper: 0).
        init_scale: the layer's init scale (reference recommendation: 1/sqrt(layers)).
    """

    def __init__(self, dim: int, num_heads: int, num_experts: int, k: int = 2, *, expert_dropout: float = 0.0,
                 init_scale: float = 1.0, check_finite: bool = True) -> None:
        name = type(self).__name__
        self.num_heads = require_int(name, "num_heads", num_heads)
        self.experts_per_head = require_int(name, "num_experts", num_experts)
        super().__init__(dim, num_heads * num_experts, check_finite=check_finite)
        self.k = require_int(name, "k", k)
        if self.k > num_experts:
            raise ValueError(f"{name}: k must be <= num_experts={num_experts}, got k={k}")
        self.expert_dropout = require_float(name, "expert_dropout", expert_dropout, below=1.0)
        self.reset_parameters(require_float(name, "init_scale", init_scale, strict=True))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_experts={self.experts_per_head}, k={self.k}, "
                f"expert_dropout={self.expert_dropout}")

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        self.gate.weight.normal_(0.0, init_scale / self.dim ** 0.5)
        renorm_rows_(self.gate.weight)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Assignments over ``tokens * heads`` rows; ``logits`` is (tokens, heads * experts)."""
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        heads, experts = self.num_heads, self.experts_per_head
        scores = torch.sigmoid(logits).view(num_tokens * heads, experts)
        row, local, weight = RF.sigmoid_top_k(scores, self.k, dropout=self.expert_dropout if self.training else 0.0,
                                              dropped="exclude")
        expert = (row % heads) * experts + local
        # The entropy statistic of each (token, head)'s scores normalised over its experts.
        share = scores / scores.sum(-1, keepdim=True)
        return self.finish(row, expert, weight, num_tokens * heads, logits=logits, probs=share, losses={})
