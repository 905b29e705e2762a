"""The one checkpoint loader and writer: safetensors with integrity checks, written atomically.

Loading checks everything (hash, readability, keys, shapes, dtypes) before it touches the model,
so a failed load changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "load_checkpoint",
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


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    entry: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load weights into ``model`` all-or-nothing.

    Raises:
        CheckpointError: on a hash mismatch, an unreadable or truncated file, missing or
            unexpected keys (with ``strict``), or a shape mismatch; the model is left unchanged.
    """
    state = read_state_dict(path, sha256=sha256, entry=entry)
    where = _describe(entry, _weights_file(Path(path)))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint for {where} does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(f"checkpoint for {where}: shape mismatch for {wrong[:20]}")
    model.load_state_dict(state, strict=strict)
    return model


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
