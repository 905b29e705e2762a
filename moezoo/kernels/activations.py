"""The expert activations, by name, shared by every backend."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "get_activation"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as torch.nn.GELU and timm
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),  # flax.linen.gelu's default
    "silu": F.silu,
    "relu": F.relu,
    "identity": lambda t: t,  # single linear experts (expert_linear)
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name``; a ``ValueError`` lists the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None
