"""The one result type every router returns: a flat list of token-to-expert assignments."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from moezoo.routers.functional import bincount


@dataclass
class Routing:
    """A routing decision as a flat list of ``A`` assignments.

    Attributes:
        token: (A,) int64, the row of ``x`` each assignment reads and writes.
        expert: (A,) int64, the expert index in ``[0, num_experts)``.
        weight: (A,) float, the combine weight (differentiable w.r.t. the router).
        num_tokens: number of rows of the routed input.
        num_experts: number of experts.
        logits: (num_tokens, num_experts) fp32 raw router logits, or None.
        losses: auxiliary losses by name, **unweighted** (coefficients live on the layer or task).
        stats: detached statistics by name (tokens per expert, dropped fraction, entropy, ...).

    A token dropped by capacity simply has fewer assignments: its output is zero and the
    residual connection carries it.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    logits: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.token.shape == self.expert.shape == self.weight.shape) or self.token.dim() != 1:
            raise ValueError(
                "Routing: token, expert and weight must be 1-d tensors of equal length, got shapes "
                f"{tuple(self.token.shape)}, {tuple(self.expert.shape)}, {tuple(self.weight.shape)}"
            )

    @property
    def num_assignments(self) -> int:
        return self.token.numel()

    def tokens_per_expert(self) -> Tensor:
        """(num_experts,) int64 count of assignments per expert."""
        return bincount(self.expert, self.num_experts)

    def dense_weights(self) -> Tensor:
        """(num_tokens, num_experts) combine-weight matrix, zero where nothing is assigned."""
        dense = self.weight.new_zeros(self.num_tokens, self.num_experts)
        return dense.index_put((self.token, self.expert), self.weight, accumulate=True)
