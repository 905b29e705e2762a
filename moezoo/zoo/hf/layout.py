"""transformers' in-memory layout of a sparse MoE block, converted at the I/O boundary.

A converted model's ``state_dict`` is moezoo's (the MoE layer: ``router.gate.weight``, the stacked
expert bank ``experts.w_in``/``experts.w_out``, ``shared.fc1``/``fc2``, ``shared_gate``). transformers'
block holds, under the same prefix:

- ``<router>.weight`` (E, dim) <-> ``router.gate.weight``; DeepSeek-V3's
  ``<router>.e_score_correction_bias`` (E,) <-> ``router.bias``;
- ``experts.gate_up_proj`` (E, 2H, dim), ``[gate; up]`` <-> ``experts.w_in`` (E, dim, 2H), ``[gate | up]``,
  its transpose; ``experts.down_proj`` (E, dim, H) <-> ``experts.w_out`` (E, H, dim);
- ``<shared>.gate_proj/up_proj.weight`` (S, dim) <-> ``shared.fc1.weight`` (2S, dim), stacked;
  ``<shared>.down_proj.weight`` <-> ``shared.fc2.weight``; ``<shared_gate>.weight`` <-> ``shared_gate.weight``.

Every other key (attention, norms, embeddings, DeepSeek's dense layers) is the same in both.
transformers' ``save_pretrained`` takes the in-memory layout and writes its on-disk one (per-expert
tensors) itself, so :func:`transformers_layout`'s ``to_foreign`` is all a save needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.zoo.checkpoint import StateDictAdapter
from moezoo.zoo.hf.architectures import Architecture

__all__ = ["block_from_transformers", "block_to_transformers", "transformers_layout"]


def _names(arch: Architecture) -> dict[str, str]:
    """moezoo name -> transformers name of every one-to-one tensor of a block (relative to it)."""
    names = {"router.gate.weight": f"{arch.router}.weight"}
    if arch.router_bias:
        names["router.bias"] = f"{arch.router}.{arch.router_bias}"
    if arch.shared:
        names["shared.fc2.weight"] = f"{arch.shared}.down_proj.weight"
    if arch.shared_gate:
        names["shared_gate.weight"] = f"{arch.shared_gate}.weight"
    return names


def block_to_transformers(state: dict[str, Tensor], arch: Architecture, prefix: str = "") -> dict[str, Tensor]:
    """A converted layer's tensors (keys ``prefix + moezoo name``) in transformers' names and shapes.

    Returns a new dict with every other key passed through.

    Raises:
        ValueError: when the layer holds a non-zero selection bias that the architecture has no
            place for (it would be lost).
    """
    out = dict(state)
    for ours, theirs in _names(arch).items():
        out[prefix + theirs] = out.pop(prefix + ours)
    bias = out.pop(prefix + "router.bias", None)  # a group-limited router's bias that transformers lacks
    if bias is not None and bool(bias.any()):
        raise ValueError(
            f"{prefix}router.bias is non-zero, but {arch.model_type} has no selection bias to save it in"
        )
    out[prefix + "experts.gate_up_proj"] = out.pop(prefix + "experts.w_in").transpose(1, 2)
    out[prefix + "experts.down_proj"] = out.pop(prefix + "experts.w_out").transpose(1, 2)
    if arch.shared:
        gate, up = out.pop(prefix + "shared.fc1.weight").chunk(2, dim=0)
        out[f"{prefix}{arch.shared}.gate_proj.weight"], out[f"{prefix}{arch.shared}.up_proj.weight"] = gate, up
    return out


def block_from_transformers(state: dict[str, Tensor], arch: Architecture, prefix: str = "", *,
                            zero_bias: bool = False) -> dict[str, Tensor]:
    """The inverse of :func:`block_to_transformers`; the expert tensors are made contiguous.

    Args:
        zero_bias: add a zero ``router.bias`` (a group-limited router on an architecture without
            selection biases, DeepSeek-V2).
    """
    out = dict(state)
    for ours, theirs in _names(arch).items():
        out[prefix + ours] = out.pop(prefix + theirs)
    if zero_bias:
        out[prefix + "router.bias"] = torch.zeros(out[prefix + "router.gate.weight"].shape[0],
                                                  device=out[prefix + "router.gate.weight"].device)
    out[prefix + "experts.w_in"] = out.pop(prefix + "experts.gate_up_proj").transpose(1, 2).contiguous()
    out[prefix + "experts.w_out"] = out.pop(prefix + "experts.down_proj").transpose(1, 2).contiguous()
    if arch.shared:
        gate = out.pop(f"{prefix}{arch.shared}.gate_proj.weight")
        up = out.pop(f"{prefix}{arch.shared}.up_proj.weight")
        out[prefix + "shared.fc1.weight"] = torch.cat([gate, up], dim=0)
    return out


def _prefixes(state: dict[str, Tensor], marker: str) -> list[str]:
    return [k[: -len(marker)] for k in state if k.endswith(marker)]


def transformers_layout(arch: Architecture, *, zero_bias: bool = False) -> StateDictAdapter:
    """The adapter between a converted model's state dict and the unconverted model's (in-memory)
    one, for :func:`moezoo.zoo.checkpoint.load_state` and ``save_pretrained``; ``zero_bias``: see
    :func:`block_from_transformers`."""

    def to_foreign(state: dict[str, Tensor]) -> dict[str, Tensor]:
        for prefix in _prefixes(state, "experts.w_in"):
            state = block_to_transformers(state, arch, prefix)
        return state

    def from_foreign(state: dict[str, Tensor]) -> dict[str, Tensor]:
        for prefix in _prefixes(state, "experts.gate_up_proj"):
            state = block_from_transformers(state, arch, prefix, zero_bias=zero_bias)
        return state

    return StateDictAdapter(f"transformers {arch.model_type}", to_foreign, from_foreign)
