"""The Time-MoE reference checkpoint layout, converted at the I/O boundary.

:class:`~moezoo.modalities.timeseries.model.TimeMoE`'s ``state_dict`` is its own parameters
(moezoo's stacked expert bank). The reference code (github Time-MoE/Time-MoE) and the public
checkpoints name the FFN weights per expert, as ``TimeMoeSparseExpertsLayer``:

- ``ffn_layer.router.gate.weight`` <-> ``ffn_layer.gate.weight``;
- ``ffn_layer.experts.w_in[j]`` (dim, 2H) = [gate | up] <-> ``ffn_layer.experts.j.gate_proj.weight``
  (H, dim) and ``ffn_layer.experts.j.up_proj.weight``; ``experts.w_out[j]`` (H, dim) <->
  ``experts.j.down_proj.weight`` (dim, H);
- ``ffn_layer.shared.fc1.weight`` (2S, dim) <-> ``shared_expert.{gate,up}_proj.weight``,
  ``shared.fc2.weight`` <-> ``shared_expert.down_proj.weight``, ``shared_gate.weight`` <->
  ``shared_expert_gate.weight``; a dense FFN (``use_dense``) the same way without the ``shared.``.

Every other key has the same name in both layouts. :data:`REFERENCE_LAYOUT` pairs the two
conversions for :func:`moezoo.zoo.checkpoint.load_checkpoint` (``from_pretrained`` and the zoo
entries load through it); :func:`to_reference` is what ``save_pretrained`` writes.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from moezoo.zoo.checkpoint import StateDictAdapter

__all__ = ["REFERENCE_LAYOUT", "from_reference", "to_reference"]

_PROJECTIONS = ("gate", "up", "down")


def _mlp_to_reference(state: dict[str, Tensor], ours: str, theirs: str) -> None:
    gate, up = state.pop(ours + "fc1.weight").chunk(2, dim=0)
    state[theirs + "gate_proj.weight"], state[theirs + "up_proj.weight"] = gate, up
    state[theirs + "down_proj.weight"] = state.pop(ours + "fc2.weight")


def _mlp_from_reference(state: dict[str, Tensor], theirs: str, ours: str) -> None:
    needed = [f"{theirs}{p}_proj.weight" for p in _PROJECTIONS]
    gate, up = state.pop(needed[0]), state.pop(needed[1])
    state[ours + "fc1.weight"] = torch.cat([gate, up], dim=0)
    state[ours + "fc2.weight"] = state.pop(needed[2])


def _ffn_prefixes(state: dict[str, Tensor], suffix: str) -> list[str]:
    """The ``...ffn_layer.`` prefixes of the keys ``<prefix><suffix>`` in ``state``."""
    return [k[: -len(suffix)] for k in state if k.endswith("ffn_layer." + suffix)]


#: (ours, the reference's) names of the MoE layers' router and shared-expert gate.
_GATE_NAMES = (("router.gate.weight", "gate.weight"), ("shared_gate.weight", "shared_expert_gate.weight"))


def to_reference(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A TimeMoE state dict in the reference's key names and shapes (a new dict; tensors shared)."""
    out = dict(state)
    for prefix in _ffn_prefixes(state, "router.gate.weight"):
        for ours, theirs in _GATE_NAMES:
            out[prefix + theirs] = out.pop(prefix + ours)
        w_in, w_out = out.pop(prefix + "experts.w_in"), out.pop(prefix + "experts.w_out")
        for j in range(w_in.shape[0]):
            gate, up = w_in[j].t().chunk(2, dim=0)
            out[f"{prefix}experts.{j}.gate_proj.weight"] = gate
            out[f"{prefix}experts.{j}.up_proj.weight"] = up
            out[f"{prefix}experts.{j}.down_proj.weight"] = w_out[j].t()
        _mlp_to_reference(out, prefix + "shared.", prefix + "shared_expert.")
    for prefix in _ffn_prefixes(out, "fc1.weight"):
        _mlp_to_reference(out, prefix, prefix)
    return out


def from_reference(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_reference` (a new dict; tensors shared). Expects a complete
    reference state (:func:`moezoo.zoo.checkpoint.load_state` checks it first)."""
    out = dict(state)
    for prefix in _ffn_prefixes(state, "gate.weight"):
        for ours, theirs in _GATE_NAMES:
            out[prefix + ours] = out.pop(prefix + theirs)
        count = sum(1 for k in state if re.fullmatch(re.escape(prefix) + r"experts\.\d+\.gate_proj\.weight", k))
        w_in, w_out = [], []
        for j in range(count):
            gate = out.pop(f"{prefix}experts.{j}.gate_proj.weight")
            up = out.pop(f"{prefix}experts.{j}.up_proj.weight")
            w_in.append(torch.cat([gate, up], dim=0).t())
            w_out.append(out.pop(f"{prefix}experts.{j}.down_proj.weight").t())
        out[prefix + "experts.w_in"] = torch.stack(w_in)
        out[prefix + "experts.w_out"] = torch.stack(w_out)
        _mlp_from_reference(out, prefix + "shared_expert.", prefix + "shared.")
    for prefix in _ffn_prefixes(out, "gate_proj.weight"):
        _mlp_from_reference(out, prefix, prefix)
    return out


#: The adapter ``from_pretrained``, ``save_pretrained`` and the Time-MoE zoo entries use.
REFERENCE_LAYOUT = StateDictAdapter("Time-MoE reference", to_reference, from_reference)
