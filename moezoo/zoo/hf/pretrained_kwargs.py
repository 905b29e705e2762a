"""Hugging Face's ``from_pretrained`` keyword conventions, resolved once for every model that takes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]

#: dtype names as config.json writes them (``"torch_dtype": "bfloat16"``).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, torch_dtype: str | torch.dtype | None, stored: str | None,
                  *, owner: str) -> torch.dtype:
    """The parameter dtype ``from_pretrained`` gives: ``dtype`` (transformers 5's name) or its older
    name ``torch_dtype``; None is float32 (transformers 4's default, and the CPU's fast path);
    ``"auto"`` is the checkpoint's own, ``stored`` (its config's ``torch_dtype``/``dtype``)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"{owner}: give dtype or torch_dtype, not both (got {dtype!r} and {torch_dtype!r})")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is None:
        return torch.float32
    if chosen == "auto":
        if stored is None:
            return torch.float32
        chosen = stored
    if isinstance(chosen, torch.dtype) and chosen in DTYPES.values():
        return chosen
    if isinstance(chosen, str) and chosen.removeprefix("torch.") in DTYPES:
        return DTYPES[chosen.removeprefix("torch.")]
    raise ValueError(f"{owner}: dtype must be None, 'auto' or one of {sorted(DTYPES)}, got {chosen!r}")


def resolve_device(device_map: str | int | torch.device | Mapping[str, Any] | None, *, owner: str) -> torch.device:
    """The one device a ``device_map`` names: a device (``"cuda:0"``, ``0``, ``torch.device``), the
    whole-model map ``{"": device}``, or ``"auto"`` (the first CUDA device if any, else the CPU).
    Maps that split the model over devices are refused: moezoo places a model on one device."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, Mapping):
        if set(device_map) != {""}:
            raise ValueError(f"{owner}: device_map must place the whole model on one device ({{'': device}}), got "
                             f"{dict(device_map)!r}; moezoo does not split a model over devices")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"{owner}: device_map={device_map!r} splits a model over devices; give one device, 'auto' or "
                         "{'': device}")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{owner}: device_map must be a device, 'auto' or {{'': device}}, got {device_map!r}") from err
