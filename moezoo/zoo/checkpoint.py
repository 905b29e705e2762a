"""The one checkpoint loader and writer: safetensors with integrity checks, written atomically.

Loading checks everything (hash, readability, keys, shapes, dtypes) before it touches the model,
so a failed load changes nothing. A folder holds ``model.safetensors`` or, as Hugging Face writes
large checkpoints, shards named by ``model.safetensors.index.json``; both are read and written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    "parse_size",
    "read_state_dict",
    "save_checkpoint",
    "sha256_of",
    "write_text_atomically",
]

WEIGHTS_NAME = "model.safetensors"
#: The index of a sharded checkpoint (Hugging Face's name): ``{"metadata": {"total_size": bytes},
#: "weight_map": {key: shard file}}``.
INDEX_NAME = "model.safetensors.index.json"

#: A function adapting a state dict to the model it is loaded into (timm's ``filter_fn``).
StateFilter = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


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


#: The pickle file of folders written without safetensors (``timm.models.save_for_hf``'s default).
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"


def _weights_file(path: Path) -> Path:
    """The file a path names: a folder's index when it is sharded, else its ``model.safetensors``
    (or, without one, its ``pytorch_model.bin``)."""
    if not path.is_dir():
        return path
    if (path / INDEX_NAME).is_file():
        return path / INDEX_NAME
    if not (path / WEIGHTS_NAME).is_file() and (path / PICKLE_WEIGHTS_NAME).is_file():
        return path / PICKLE_WEIGHTS_NAME
    return path / WEIGHTS_NAME


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string as Hugging Face's ``max_shard_size`` ("5GB", "200MB",
    "1GiB"; KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    if match is None or match.group(2).upper() not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int of bytes or a size such as '5GB' or '500MiB' "
                         f"(units {sorted(u for u in _SIZE_UNITS if u)}), got {size!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _read_safetensors(file: Path, where: str) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint for {where}: not a readable safetensors file ({err})") from err


def _read_sharded(index_file: Path, where: str) -> dict[str, Tensor]:
    """Every shard an index names, checked against its weight map (each key once, in its shard)."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint for {where}: not a valid {INDEX_NAME} ({err!r})") from err
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = index_file.parent / shard
        if Path(shard).name != shard or not file.is_file():
            raise CheckpointError(f"checkpoint for {where}: shard {shard!r} named by the index is missing")
        tensors = _read_safetensors(file, f"{where} (shard {shard})")
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != expected:
            raise CheckpointError(
                f"checkpoint for {where}: shard {shard} holds {sorted(set(tensors) - expected)[:10]} beyond the index "
                f"and lacks {sorted(expected - set(tensors))[:10]}"
            )
        state.update(tensors)
    return state


def read_state_dict(path: str | os.PathLike, *, sha256: str | None = None, entry: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file, a directory holding ``model.safetensors``
    or a sharded checkpoint (``model.safetensors.index.json`` and its shards; the index file may
    also be named directly), or a Lightning ``.ckpt`` or a ``pytorch_model.bin`` (loaded with
    ``weights_only=True``; a Lightning task's ``model.`` prefix is stripped).

    Args:
        path: the file or directory.
        sha256: expected hex digest of the file (a single file, not a sharded checkpoint); a
            mismatch raises before anything is read.
        entry: zoo entry name, for error messages.
    """
    file = _weights_file(Path(path))
    where = _describe(entry, file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint for {where}: file not found")
    if file.name.endswith(".index.json"):
        if sha256 is not None:
            raise CheckpointError(f"checkpoint for {where}: a sha256 names one file, but this checkpoint is sharded")
        return _read_sharded(file, where)
    if sha256 is not None:
        actual = sha256_of(file)
        if actual != sha256.lower():
            raise CheckpointError(f"checkpoint for {where}: sha256 mismatch, expected {sha256}, got {actual}")
    if file.suffix in (".ckpt", ".bin"):
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged or unsafe file
            kind = "Lightning checkpoint" if file.suffix == ".ckpt" else file.name
            raise CheckpointError(f"checkpoint for {where}: cannot read {kind}: {err}") from err
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint for {where}: no state_dict inside")
        prefix = "model."
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        return dict(state)
    return _read_safetensors(file, where)


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
               adapter: StateDictAdapter | None = None, filter_fn: StateFilter | None = None) -> nn.Module:
    """Load an in-memory state dict into ``model`` all-or-nothing: keys and shapes are checked
    before the model is touched.

    Args:
        where: what the state came from, for messages.
        adapter: a foreign layout the state may be in. The state is checked in the layout whose
            keys it shares most (the model's own, or the adapter's, so that errors name the keys as
            the file has them) and converted to the model's own before loading.
        filter_fn: ``filter_fn(state, model) -> state`` run on the state in the model's layout
            before the checks (timm's ``filter_fn``: e.g. a new head, resampled position embeddings).

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
    if filter_fn is not None:
        state = filter_fn(dict(state), model)
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
    filter_fn: StateFilter | None = None,
) -> nn.Module:
    """Load weights from a file or folder into ``model`` all-or-nothing (see :func:`read_state_dict`
    and :func:`load_state`).

    Raises:
        CheckpointError: on a hash mismatch, an unreadable or truncated file, a missing shard,
            missing or unexpected keys (with ``strict``), or a shape mismatch; the model is left
            unchanged.
    """
    state = read_state_dict(path, sha256=sha256, entry=entry)
    return load_state(model, state, where=_describe(entry, _weights_file(Path(path))), strict=strict, adapter=adapter,
                      filter_fn=filter_fn)


def _replace_atomically(target: Path, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file in ``target``'s folder, then rename it into place:
    readers see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain write would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _write_atomically(tensors: Mapping[str, Tensor], target: Path, metadata: Mapping[str, str] | None) -> Path:
    """safetensors written to ``target`` atomically (:func:`_replace_atomically`)."""
    return _replace_atomically(target, lambda tmp: save_file(dict(tensors), tmp,
                                                             metadata=dict(metadata) if metadata else None))


def _shards(tensors: Mapping[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors of at most ``limit`` bytes (a larger tensor alone), in key order."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _remove(path: Path) -> None:
    if path.exists():
        path.unlink()


def save_checkpoint(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None, *, max_shard_size: int | str | None = None) -> Path:
    """Write weights as safetensors atomically (temporary files in the same folder, then renames).

    ``path`` may be a directory, in which case ``model.safetensors`` is written inside it, or,
    when the weights exceed ``max_shard_size`` (bytes, or a size such as ``"5GB"``; see
    :func:`parse_size`), shards ``model-00001-of-0000N.safetensors`` and the index
    ``model.safetensors.index.json``, as Hugging Face writes them.

    The index (or ``model.safetensors``) is what makes a folder a checkpoint, and it is written
    last: a previous index is removed before the new shards replace the old ones, and weights files
    of the previous checkpoint that the new one does not use are removed after. An interrupted save
    therefore leaves the previous checkpoint, the new one, or none, never a mixture of the two.

    Returns:
        The file written (the index when sharded).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    target = Path(path)
    folder = target.is_dir() or target.suffix == ""
    if max_shard_size is not None and not folder:
        raise ValueError(f"save_checkpoint: max_shard_size={max_shard_size!r} needs a folder, got the file {target}")
    if folder:
        target.mkdir(parents=True, exist_ok=True)
        target = target / WEIGHTS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a contiguous copy is what gets written.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    shards = _shards(tensors, parse_size(max_shard_size)) if max_shard_size is not None else [tensors]
    if not folder:
        return _write_atomically(tensors, target, metadata)
    directory = target.parent
    index_file = directory / INDEX_NAME
    previous = set()
    if index_file.is_file():
        try:
            previous = set(json.loads(index_file.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError):
            previous = set()
    count = len(shards)
    names_list = [WEIGHTS_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    staged = []
    try:  # every new file complete before anything of the old checkpoint is touched
        for name, shard in zip(names_list, shards):
            staged.append(_write_atomically(shard, directory / f".{name}.staged", metadata))
    except BaseException:
        for file in staged:
            _remove(file)
        raise
    _remove(index_file)  # the old sharded checkpoint stops being one before its shards are replaced
    if count == 1:
        os.replace(staged[0], target)
        written, names = target, {WEIGHTS_NAME}
    else:
        _remove(target)
        for file, name in zip(staged, names_list):
            os.replace(file, directory / name)
        weight_map = {key: name for name, shard in zip(names_list, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = json.dumps({"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}, indent=2)
        written, names = write_text_atomically(index_file, index + "\n"), set(names_list)
    for stale in previous - names:
        _remove(directory / stale)
    return written


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)``, atomically (:func:`_replace_atomically`)."""
    return _replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
