"""The one checkpoint loader and writer: safetensors with integrity checks, written atomically.

Loading checks everything (hash, readability, keys, shapes, dtypes) before it touches the model,
so a failed load changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moezoo.layers.expert_parallel import expert_shards, localize_expert_state

__all__ = [
    "CheckpointError",
    "StateDictAdapter",
    "load_checkpoint",
    "load_state",
    "read_state_dict",
    "save_checkpoint",
    "sha256_of",
]

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the entry, the file and the keys."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(entry: str | None, path: Path) -> str:
    return f"{entry!r} ({path})" if entry else str(path)


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def read_state_dict(path: str | os.PathLike, *, sha256: str | None = None, entry: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file, a directory holding ``model.safetensors``,
    or a Lightning ``.ckpt`` (loaded with ``weights_only=True``; the task's ``model.`` prefix is
    stripped).

    Args:
        path: the file or directory.
        sha256: expected hex digest of the file; a mismatch raises before anything is read.
        entry: zoo entry name, for error messages.
    """
    file = _weights_file(Path(path))
    where = _describe(entry, file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint for {where}: file not found")
    if sha256 is not None:
        actual = sha256_of(file)
        if actual != sha256.lower():
            raise CheckpointError(f"checkpoint for {where}: sha256 mismatch, expected {sha256}, got {actual}")
    if file.suffix == ".ckpt":
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged or unsafe file
            raise CheckpointError(f"checkpoint for {where}: cannot read Lightning checkpoint: {err}") from err
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint for {where}: no state_dict inside")
        prefix = "model."
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        return dict(state)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint for {where}: not a readable safetensors file ({err})") from err


@dataclass(frozen=True)
class StateDictAdapter:
    """A foreign checkpoint layout, converted at the I/O boundary (never in module hooks).

    Attributes:
        name: the layout, for messages (e.g. "Time-MoE reference").
        to_foreign: a model's own state dict -> the same weights in the foreign names and shapes.
        from_foreign: the inverse.
    """

    name: str
    to_foreign: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    from_foreign: Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _check_against(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str, strict: bool) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint for {where} does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"checkpoint for {where}: shape mismatch for {wrong[:20]}")


def load_state(model: nn.Module, state: Mapping[str, Tensor], *, where: str = "state dict", strict: bool = True,
               adapter: StateDictAdapter | None = None) -> nn.Module:
    """Load an in-memory state dict into ``model`` all-or-nothing: keys and shapes are checked
    before the model is touched.

    Args:
        where: what the state came from, for messages.
        adapter: a foreign layout the state may be in. The state is checked in the layout whose
            keys it shares most (the model's own, or the adapter's, so that errors name the keys as
            the file has them) and converted to the model's own before loading.

    A state holds all E experts of every expert bank; a model whose banks are sharded (expert
    parallelism) keeps its shard of them, at any expert-parallel size.

    Raises:
        CheckpointError: missing or unexpected keys (with ``strict``) or a shape mismatch.
    """
    own = model.state_dict()
    if adapter is not None:
        foreign = adapter.to_foreign(own)
        if len(set(state) & set(foreign)) > len(set(state) & set(own)):
            _check_against(state, foreign, f"{where} ({adapter.name} layout)", strict)
            state = adapter.from_foreign(dict(state))
    if expert_shards(model):  # checkpoints hold every expert; an expert-parallel rank keeps its shard
        try:
            state = localize_expert_state(model, dict(state))
        except ValueError as err:
            raise CheckpointError(f"checkpoint for {where}: {err}") from err
    _check_against(state, own, where, strict)
    model.load_state_dict(state, strict=strict)
    return model


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    entry: str | None = None,
    strict: bool = True,
    adapter: StateDictAdapter | None = None,
) -> nn.Module:
    """Load weights from a file into ``model`` all-or-nothing (see :func:`load_state`).

    Raises:
        CheckpointError: on a hash mismatch, an unreadable or truncated file, missing or
            unexpected keys (with ``strict``), or a shape mismatch; the model is left unchanged.
    """
    state = read_state_dict(path, sha256=sha256, entry=entry)
    return load_state(model, state, where=_describe(entry, _weights_file(Path(path))), strict=strict, adapter=adapter)


def save_checkpoint(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write weights as safetensors atomically (temporary file in the same folder, then rename).

    ``path`` may be a directory, in which case ``model.safetensors`` is written inside it.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    target = Path(path)
    if target.is_dir() or target.suffix == "":
        target.mkdir(parents=True, exist_ok=True)
        target = target / WEIGHTS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a contiguous copy is what gets written.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        # mkstemp creates the file private (0600); give it the permissions a plain write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
