"""The moezoo layer a transformers sparse MoE block becomes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moezoo.checks import require_float
from moezoo.layers.moe import MoE

__all__ = ["TransformersMoE"]


def _record_router_logits(logits: Tensor | None) -> None:
    """Hand this layer's router logits to the forward that asked for them.

    transformers collects ``router_logits`` (``output_router_logits=True``) with forward hooks on its
    router classes, which a converted model no longer has; the hooks append each router's logits to
    the collector of the model forward in progress, and so does this, in layer order.
    """
    from transformers.utils import output_capturing  # here: importing transformers takes seconds

    collected = output_capturing._active_collector.get()
    if logits is not None and collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


class TransformersMoE(MoE):
    """:class:`~moezoo.layers.moe.MoE` in the place of a transformers sparse MoE block
    (:func:`moezoo.zoo.hf.from_transformers`); ``forward(hidden_states: (batch, seq, dim)) -> (batch,
    seq, dim)``, as the block it replaces.

    Besides the MoE layer it keeps what the block does around the routing: the multiplicative input
    jitter (Mixtral's ``router_jitter_noise``, PhiMoE's ``input_jitter_noise``), which in transformers
    scales the block's input in place, so the router and the experts both see it; and the router
    logits for ``output_router_logits=True``.

    Args:
        *args, **kwargs: those of :class:`~moezoo.layers.moe.MoE`.
        input_jitter: in training, the input is multiplied by ``U(1 - j, 1 + j)`` once per entry,
            in order (PhiMoE draws twice: in its block and again in its router).
    """

    def __init__(self, *args, input_jitter: Sequence[float] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_jitter = tuple(require_float("TransformersMoE", "input_jitter", j, below=1.0) for j in input_jitter)

    def extra_repr(self) -> str:
        jitter = f", input_jitter={self.input_jitter}" if self.input_jitter else ""
        return super().extra_repr() + jitter

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states: (..., dim) -> (..., dim)."""
        if self.training:
            for jitter in self.input_jitter:
                hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
        out = super().forward(hidden_states)
        _record_router_logits(self.last_logits)
        return out
