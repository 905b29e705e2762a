"""Reading google-research/vmoe's ``.index`` + ``.data-nnnnn-of-NNNNN`` checkpoints without JAX.

The format (written by ``vmoe.checkpoints.partitioned.save_checkpoint``): ``<prefix>.index`` is a
msgpack map ``{"shard_count": n, "index": <nested names -> IndexInfo>, "version": "20220622"}``
(no ``version`` key before 2022-06-22). Each ``IndexInfo`` holds the array's global shape and dtype
and the global slices of its chunks with the shard that stores each one. A shard
``<prefix>.data-%05d-of-%05d`` is a msgpack map from a leaf id to ``[[flat sub-chunks], slice]``
pairs; the leaf id is the array's position in a depth-first walk of the index over **sorted** keys
(JAX's flattening order), the only ordering information the format stores.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from moezoo.zoo.checkpoint import CheckpointError
from moezoo.zoo.registry import download_url, url_cache_path

__all__ = ["checkpoint_url", "fetch_vmoe_checkpoint", "read_index", "read_vmoe_checkpoint", "shard_paths"]

#: vmoe publishes ``gs://vmoe_checkpoints/<name>``; the bucket is public over HTTPS.
GCS_HTTPS = "https://storage.googleapis.com/"

_VERSIONS = (None, "20220622")
_CHUNKS_MAGIC = "__msgpack_array_chunk_a87ca2__"
# vmoe's msgpack extension codes (vmoe/checkpoints/serialization.py); 2 (complex) and 7
# (SliceNdArray) never occur in a checkpoint of parameters.
_NDARRAY, _NPSCALAR, _SHAPED_ARRAY, _SLICE, _SLICE_ND, _INDEX_INFO = 1, 3, 4, 5, 6, 8

Slices = tuple[tuple[int, int], ...]


class _IndexInfo:
    __slots__ = ("shape", "dtype", "slices", "shards")

    def __init__(self, shape: tuple[int, ...], dtype: str, slices: list[Slices], shards: list[int]) -> None:
        self.shape, self.dtype, self.slices, self.shards = shape, dtype, slices, shards


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def _ndarray(data: bytes) -> np.ndarray:
    shape, dtype, buffer = _unpack(data)
    dtype = _text(dtype)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widening it is exact.
        raw = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape).copy()


def _slice_nd(data: bytes) -> Slices:
    return tuple(tuple(_unpack(part)[:2]) for part in _unpack(data))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _NDARRAY:
        return _ndarray(data)
    if code == _NPSCALAR:
        return _ndarray(data)[()]
    if code == _SHAPED_ARRAY:
        shape, dtype = _unpack(data)[:2]  # then weak_type and (old files) named_shape
        return tuple(shape), _text(dtype)
    if code == _SLICE:
        return tuple(_unpack(data))
    if code == _SLICE_ND:
        return _slice_nd(data)
    if code == _INDEX_INFO:
        shaped, slices, shards = _unpack(data)
        shape, dtype = _ext_hook(_SHAPED_ARRAY, shaped)
        return _IndexInfo(shape, dtype, [_slice_nd(s) for s in slices], list(shards))
    raise ValueError(f"unknown msgpack extension type {code}")


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"vmoe checkpoint: {path} not found")
    try:
        return _unpack(path.read_bytes())
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise CheckpointError(f"vmoe checkpoint: {path} is not a readable vmoe msgpack file ({err})") from err


def _leaves(tree: Any, path: str, index_file: Path) -> list[tuple[str, _IndexInfo]]:
    """(name, info) in JAX's flattening order: depth first over sorted keys."""
    if isinstance(tree, _IndexInfo):
        return [(path, tree)]
    if not isinstance(tree, dict):
        raise CheckpointError(f"vmoe checkpoint: {index_file}: unexpected {type(tree).__name__} at {path or '<root>'!r}")
    out = []
    for key in sorted(tree):
        out += _leaves(tree[key], f"{path}/{key}" if path else str(key), index_file)
    return out


def shard_paths(prefix: str | os.PathLike, shard_count: int) -> list[Path]:
    """The data files of a checkpoint with ``shard_count`` shards."""
    return [Path(f"{os.fspath(prefix)}.data-{i:05d}-of-{shard_count:05d}") for i in range(shard_count)]


def read_index(prefix: str | os.PathLike) -> tuple[int, list[tuple[str, _IndexInfo]]]:
    """``(shard_count, [(flax name, IndexInfo), ...])`` from ``<prefix>.index``, leaves in leaf-id order."""
    prefix = os.fspath(prefix)
    index_file = Path(prefix + ".index")
    if not index_file.is_file() and Path(prefix).is_dir():
        raise CheckpointError(
            f"vmoe checkpoint: {prefix} is a folder, not a checkpoint prefix (a prefix names "
            "<prefix>.index and <prefix>.data-*; Orbax/OCDBT checkpoint folders are not supported)"
        )
    content = _read(index_file)
    if not isinstance(content, dict) or not {"shard_count", "index"} <= set(content):
        raise CheckpointError(f"vmoe checkpoint: {index_file} is not a vmoe index (no 'shard_count' and 'index')")
    if content.get("version") not in _VERSIONS:
        raise CheckpointError(
            f"vmoe checkpoint: {index_file} has format version {content['version']!r}; supported: "
            f"{[v for v in _VERSIONS if v]} and the unversioned format before it"
        )
    shard_count = content["shard_count"]
    if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
        raise CheckpointError(f"vmoe checkpoint: {index_file}: shard_count must be an int >= 1, got {shard_count!r}")
    leaves = _leaves(content["index"], "", index_file)
    for name, info in leaves:
        if len(info.slices) != len(info.shards) or any(not 0 <= s < shard_count for s in info.shards):
            raise CheckpointError(
                f"vmoe checkpoint: {index_file}: {name} names shards {info.shards} of a checkpoint with "
                f"{shard_count} shards"
            )
        _check_cover(name, info, index_file)
    return shard_count, leaves


def _volume(slices: Slices) -> int:
    return int(np.prod([stop - start for start, stop in slices], dtype=np.int64))


def _check_cover(name: str, info: _IndexInfo, where: Path) -> None:
    """The chunks of an array lie inside it, do not overlap and together cover it."""
    for s in info.slices:
        if len(s) != len(info.shape) or any(not 0 <= a < b <= n for (a, b), n in zip(s, info.shape)):
            raise CheckpointError(f"vmoe checkpoint: {where}: chunk {s} of {name} is outside its shape {info.shape}")
    for i, a in enumerate(info.slices):
        for b in info.slices[i + 1 :]:
            if all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b)):
                raise CheckpointError(f"vmoe checkpoint: {where}: chunks {a} and {b} of {name} overlap")
    covered = sum(_volume(s) for s in info.slices)
    if covered != int(np.prod(info.shape, dtype=np.int64)):
        raise CheckpointError(
            f"vmoe checkpoint: {where}: the chunks of {name} cover {covered} of its "
            f"{int(np.prod(info.shape, dtype=np.int64))} elements"
        )


def read_vmoe_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a vmoe checkpoint by flax name (``"Encoder/encoderblock_0/Mlp/Dense_0/kernel"``).

    Reads ``<prefix>.index`` and every ``<prefix>.data-nnnnn-of-NNNNN`` it names, both index
    format versions, with msgpack and numpy only. Arrays come back with the checkpoint's shapes
    and dtypes (bfloat16 widened exactly to float32), in leaf-id (sorted-name) order.

    Raises:
        CheckpointError: naming the file, when the index or a shard is missing, truncated or not a
            vmoe file, when an index names a shard that is not there, or when the chunks stored for
            an array do not cover it exactly. Nothing is returned in that case.
    """
    shard_count, leaves = read_index(prefix)
    paths = shard_paths(prefix, shard_count)
    needed = sorted({shard for _, info in leaves for shard in info.shards})
    missing = [str(paths[s]) for s in needed if not paths[s].is_file()]
    if missing:
        raise CheckpointError(f"vmoe checkpoint: shard files not found: {missing}")
    expected = {(leaf, s): shard for leaf, (_, info) in enumerate(leaves) for s, shard in zip(info.slices, info.shards)}
    arrays = [np.empty(info.shape, dtype=np.float32 if info.dtype == "bfloat16" else np.dtype(info.dtype))
              for _, info in leaves]
    found: set[tuple[int, Slices]] = set()
    for shard in needed:
        path = paths[shard]
        content = _read(path)
        if not isinstance(content, dict) or content.get(_CHUNKS_MAGIC) is not True:
            raise CheckpointError(f"vmoe checkpoint: {path} is not a vmoe data shard")
        for key, chunks in content.items():
            if key == _CHUNKS_MAGIC:
                continue
            leaf = int(key) if str(key).isdigit() else -1
            if not 0 <= leaf < len(leaves):
                raise CheckpointError(f"vmoe checkpoint: {path} holds leaf {key!r}, the index has {len(leaves)}")
            name, info = leaves[leaf]
            for subchunks, slices in chunks:
                slices = tuple(tuple(s) for s in slices)
                if expected.get((leaf, slices)) != shard:
                    raise CheckpointError(f"vmoe checkpoint: {path} holds chunk {slices} of {name}, not in the index")
                flat = np.concatenate([np.asarray(c).reshape(-1) for c in subchunks])
                if flat.size != _volume(slices) or flat.dtype != arrays[leaf].dtype:
                    raise CheckpointError(
                        f"vmoe checkpoint: {path}: chunk {slices} of {name} holds {flat.size} {flat.dtype} values, "
                        f"the index says {_volume(slices)} {arrays[leaf].dtype}"
                    )
                arrays[leaf][tuple(slice(a, b) for a, b in slices)] = flat.reshape([b - a for a, b in slices])
                found.add((leaf, slices))
    absent = sorted({leaves[leaf][0] for leaf, s in expected if (leaf, s) not in found})
    if absent:
        raise CheckpointError(f"vmoe checkpoint: {os.fspath(prefix)}: chunks named by the index are not in their shards "
                              f"for {absent[:10]}")
    return {name: array for (name, _), array in zip(leaves, arrays)}


def checkpoint_url(prefix: str | os.PathLike) -> str | None:
    """The URL of a remote checkpoint prefix (``gs://bucket/name`` -> its public HTTPS address;
    ``https://``, ``http://`` and ``file://`` as given), or None for a local path."""
    prefix = os.fspath(prefix)
    if prefix.startswith("gs://"):
        return GCS_HTTPS + prefix[len("gs://"):]
    return prefix if re.match(r"^(https?|file)://", prefix) else None


def fetch_vmoe_checkpoint(prefix: str | os.PathLike) -> Path:
    """A local prefix for ``prefix``: a local path as is; a remote one (see :func:`checkpoint_url`)
    downloaded once into the zoo's URL cache, the index first (it names the shards), then every
    shard, all into one folder keyed by the prefix URL."""
    url = checkpoint_url(prefix)
    if url is None:
        return Path(prefix)
    local = url_cache_path(url)
    download_url(url + ".index", Path(f"{local}.index"))
    shard_count, _ = read_index(local)
    for path in shard_paths(local, shard_count):
        download_url(url + path.name[len(local.name):], path)
    return local
