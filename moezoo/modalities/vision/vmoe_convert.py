"""google-research/vmoe checkpoints as moezoo models: architecture from the parameter names and
shapes, a name/shape mapping onto moezoo's state dict, and :func:`from_vmoe_checkpoint`.

The conversion happens here, at load time; the models' own ``state_dict`` stays moezoo's.
vmoe's conventions that moezoo expresses as constructor options: tanh GELU
(``activation="gelu_tanh"``), the ``pre_logits`` layer (``representation_size``), the final norm
on every token before pooling (``fc_norm=False``), groups counted in tokens (``group_size``),
bfloat16 dispatch (``bfloat16_dispatch``) and E^3 (``ensemble_size``). Images are NCHW in
[-1, 1] (vmoe's ``value_range(-1, 1)``; vmoe takes NHWC).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moezoo.modalities.vision.model import SoftMoEVisionTransformer, VisionTransformerMoE
from moezoo.modalities.vision.vmoe_checkpoint import (
    fetch_vmoe_checkpoint,
    read_index,
    read_vmoe_checkpoint,
    shard_paths,
)
from moezoo.zoo.cards import card_path
from moezoo.zoo.checkpoint import save_checkpoint
from moezoo.zoo.registry import PretrainedCfg, create_model, export_model, get_entry, list_models, url_cache_path

__all__ = [
    "GENERIC_ENTRIES",
    "convert_vmoe_checkpoint",
    "from_vmoe_checkpoint",
    "resize_pos_embedding",
    "vmoe_architecture",
    "vmoe_state_dict",
    "zoo_weights",
]

#: The zoo entries that hold a converted checkpoint of any architecture (config.json gives
#: every argument), by model class.
GENERIC_ENTRIES = {VisionTransformerMoE: "vmoe_vit", SoftMoEVisionTransformer: "soft_moe_vit"}

_BLOCK = re.compile(r"^Encoder/encoderblock_(\d+)/")
_POS = "Encoder/posembed_input/pos_embedding"


def _get(arrays: dict[str, np.ndarray], name: str, ndim: int | None = None) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"vmoe checkpoint: parameter {name!r} is missing, cannot infer the architecture")
    value = arrays[name]
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"vmoe checkpoint: parameter {name!r} has shape {value.shape}, expected {ndim} dimensions")
    return value


def _depth(arrays: dict[str, np.ndarray]) -> int:
    blocks = sorted({int(m.group(1)) for name in arrays if (m := _BLOCK.match(name))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"vmoe checkpoint: encoder blocks must be Encoder/encoderblock_0..n-1, found {blocks}")
    return len(blocks)


def _block(i: int) -> str:
    return f"Encoder/encoderblock_{i}/"


def vmoe_architecture(arrays: dict[str, np.ndarray], *, img_size: int | None = None,
                      ensemble_size: int | None = None) -> tuple[type[nn.Module], dict[str, Any]]:
    """The moezoo class and its architecture arguments for a vmoe parameter tree.

    Inferred: patch size, channels, width, heads (from the query kernel's (width, heads,
    head_dim)), depth, MLP width, MoE blocks and E, Soft MoE slots, qk-norm, token or GAP
    classifier, ``pre_logits`` width, classes and image size (square grid from the position
    embedding; ``img_size`` overrides it, the embedding is then resized, see
    :func:`resize_pos_embedding`). E^3 (``ensemble_size`` members) is read from a router kernel
    of shape (width, M, E/M), or taken from ``ensemble_size`` for a (width, E) kernel. Routing
    settings are not in a checkpoint; :func:`from_vmoe_checkpoint` takes them.

    Raises:
        ValueError: naming the parameter whose shape or absence cannot be mapped.
    """
    kernel = _get(arrays, "embedding/kernel", 4)
    patch, patch_w, in_chans, width = kernel.shape
    if patch != patch_w:
        raise ValueError(f"vmoe checkpoint: embedding/kernel {kernel.shape} has a non-square patch")
    depth = _depth(arrays)
    query = _get(arrays, _block(0) + "SelfAttention/query/kernel", 3)
    _, heads, head_dim = query.shape
    if heads * head_dim != width:
        raise ValueError(
            f"vmoe checkpoint: {_block(0)}SelfAttention/query/kernel {query.shape}: heads x head_dim must equal "
            f"the width {width}"
        )
    token = "cls" in arrays
    for unsupported in ("MapHead/probe",):
        if unsupported in arrays:
            raise ValueError(f"vmoe checkpoint: parameter {unsupported!r}: the 'map' classifier is not supported")
    pos = _get(arrays, _POS, 3)
    grid = math.isqrt(pos.shape[1] - token)
    if grid * grid != pos.shape[1] - token:
        raise ValueError(f"vmoe checkpoint: {_POS} {pos.shape} is not a square grid of patches"
                         f"{' plus the class token' if token else ''}")
    head = _get(arrays, "head/kernel", 2)
    representation = arrays.get("pre_logits/kernel")

    moe_blocks, experts, soft, slots, mlp, members = [], set(), set(), set(), set(), set()
    for i in range(depth):
        prefix = _block(i)
        if prefix + "Moe/Mlp/Dense_0/kernel" in arrays:
            w_in = _get(arrays, prefix + "Moe/Mlp/Dense_0/kernel", 3)
            moe_blocks.append(i)
            experts.add(w_in.shape[0])
            mlp.add(w_in.shape[2])
            if prefix + "Moe/Router/mu" in arrays:
                soft.add(True)
                slots.add(_get(arrays, prefix + "Moe/Router/mu", 3).shape[2])
            else:
                soft.add(False)
                gate = _get(arrays, prefix + "Moe/Router/dense/kernel")
                if gate.ndim == 3:
                    members.add(gate.shape[1])
                elif gate.ndim != 2:
                    raise ValueError(f"vmoe checkpoint: {prefix}Moe/Router/dense/kernel has shape {gate.shape}")
        else:
            mlp.add(_get(arrays, prefix + "Mlp/Dense_0/kernel", 2).shape[1])
    if len(mlp) != 1 or len(experts) > 1 or len(soft) > 1 or len(slots) > 1 or len(members) > 1:
        raise ValueError(
            f"vmoe checkpoint: blocks differ in MLP width {sorted(mlp)}, experts {sorted(experts)}, router kind "
            f"or slots {sorted(slots)} / ensemble {sorted(members)}; moezoo's ViTs need one of each"
        )
    if not moe_blocks:
        raise ValueError("vmoe checkpoint: no Encoder/encoderblock_*/Moe parameters: not an MoE checkpoint")
    (hidden,), is_soft = mlp, soft == {True}
    if int(width * (hidden / width)) != hidden:
        raise ValueError(f"vmoe checkpoint: MLP width {hidden} is not representable as mlp_ratio x {width}")
    qk_norm = _block(0) + "SelfAttention/query_ln/scale" in arrays
    if img_size is None:
        img_size = grid * patch
    elif isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < patch or img_size % patch:
        raise ValueError(f"img_size must be a multiple of the patch size {patch}, got {img_size!r}")
    kwargs: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=head.shape[1], embed_dim=width,
        depth=depth, num_heads=heads, mlp_ratio=hidden / width, activation="gelu_tanh",
        representation_size=None if representation is None else int(representation.shape[1]),
        moe_blocks=moe_blocks, num_experts=experts.pop(),
    )
    if is_soft:
        if token:
            raise ValueError("vmoe checkpoint: parameter 'cls': a Soft MoE ViT with a class token is not supported")
        if ensemble_size is not None:
            raise ValueError(f"ensemble_size={ensemble_size} given for a Soft MoE checkpoint (E^3 is V-MoE only)")
        return SoftMoEVisionTransformer, dict(kwargs, qk_norm=qk_norm, fc_norm=False, slots_per_expert=slots.pop())
    if qk_norm:
        raise ValueError(f"vmoe checkpoint: parameter {_block(0)}SelfAttention/query_ln/scale: qk-norm V-MoE is "
                         "not supported")
    stored = members.pop() if members else None
    if stored is not None and ensemble_size is not None and stored != ensemble_size:
        raise ValueError(f"ensemble_size={ensemble_size}, but the router kernels are for {stored} members")
    ensemble = ensemble_size or stored or 1
    kwargs.update(class_token=token, global_pool="token" if token else "avg", fc_norm=False)
    if ensemble > 1:
        kwargs["ensemble_size"] = ensemble
    return VisionTransformerMoE, kwargs


def resize_pos_embedding(pos: np.ndarray, grid: int, *, class_token: bool) -> np.ndarray:
    """vmoe's ``vit_zoom``: (1, [1 +] g*g, D) -> (1, [1 +] grid*grid, D), linear interpolation of the
    patch grid (``scipy.ndimage.zoom``, order 1); the class token's embedding is kept."""
    from scipy import ndimage

    tok, patches = (pos[:, :1], pos[:, 1:]) if class_token else (pos[:, :0], pos)
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos
    square = patches.reshape(1, old, old, -1)
    zoomed = ndimage.zoom(square, (1, grid / old, grid / old, 1), order=1).reshape(1, grid * grid, -1)
    return np.concatenate([tok, zoomed.astype(pos.dtype)], axis=1)


def _tensor(value: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # keeps 0-d arrays 0-d


def vmoe_state_dict(arrays: dict[str, np.ndarray], *, img_size: int | None = None,
                    ensemble_size: int | None = None) -> dict[str, Tensor]:
    """vmoe parameters (flax names) -> the moezoo model's state dict (float32 tensors).

    Every vmoe parameter is used exactly once; a parameter the mapping does not know raises a
    ``ValueError`` naming it. Transforms: HWIO patch kernel -> OIHW; query/key/value (D, H, Dh)
    kernels -> rows of the fused ``qkv`` (3 D, D); (H, Dh, D) output kernel -> (D, D); Dense
    kernels transposed; expert kernels (E, D, F) / (E, F, D) kept; the router kernel (D, E) or
    E^3's (D, M, E/M) -> (E, D); qk-norm scales get a zero bias (flax's LayerNorm has none there).
    """
    cls, kwargs = vmoe_architecture(arrays, img_size=img_size, ensemble_size=ensemble_size)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return _get(arrays, name)

    token = "cls" in arrays
    grid = kwargs["img_size"] // kwargs["patch_size"]
    state = {
        "patch_embed.proj.weight": _tensor(take("embedding/kernel").transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _tensor(take("embedding/bias")),
        "pos_embed": _tensor(resize_pos_embedding(take(_POS), grid, class_token=token)),
        "norm.weight": _tensor(take("Encoder/encoder_norm/scale")),
        "norm.bias": _tensor(take("Encoder/encoder_norm/bias")),
        "head.weight": _tensor(take("head/kernel").T),
        "head.bias": _tensor(take("head/bias")),
    }
    if token:
        state["cls_token"] = _tensor(take("cls"))
    if kwargs["representation_size"] is not None:
        state["pre_logits.fc.weight"] = _tensor(take("pre_logits/kernel").T)
        state["pre_logits.fc.bias"] = _tensor(take("pre_logits/bias"))
    width = kwargs["embed_dim"]
    for i in range(kwargs["depth"]):
        src, dst = _block(i), f"blocks.{i}."
        for j, norm in ((0, "norm1"), (1, "norm2")):
            state[dst + f"{norm}.weight"] = _tensor(take(src + f"LayerNorm_{j}/scale"))
            state[dst + f"{norm}.bias"] = _tensor(take(src + f"LayerNorm_{j}/bias"))
        att = src + "SelfAttention/"
        state[dst + "attn.qkv.weight"] = _tensor(np.concatenate(
            [take(att + f"{p}/kernel").reshape(width, width).T for p in ("query", "key", "value")]))
        state[dst + "attn.qkv.bias"] = _tensor(np.concatenate(
            [take(att + f"{p}/bias").reshape(width) for p in ("query", "key", "value")]))
        state[dst + "attn.proj.weight"] = _tensor(take(att + "out/kernel").reshape(width, width).T)
        state[dst + "attn.proj.bias"] = _tensor(take(att + "out/bias"))
        if cls is SoftMoEVisionTransformer and kwargs["qk_norm"]:
            for p, norm in (("query", "q_norm"), ("key", "k_norm")):
                scale = take(att + f"{p}_ln/scale")
                state[dst + f"attn.{norm}.weight"] = _tensor(scale)
                state[dst + f"attn.{norm}.bias"] = torch.zeros(scale.shape)
        if i in kwargs["moe_blocks"]:
            moe = src + "Moe/"
            for j, (w, b) in enumerate((("w_in", "b_in"), ("w_out", "b_out"))):
                state[dst + f"mlp.experts.{w}"] = _tensor(take(moe + f"Mlp/Dense_{j}/kernel"))
                state[dst + f"mlp.experts.{b}"] = _tensor(take(moe + f"Mlp/Dense_{j}/bias"))
            if cls is SoftMoEVisionTransformer:
                state[dst + "mlp.mu"] = _tensor(take(moe + "Router/mu"))
                state[dst + "mlp.scale"] = _tensor(take(moe + "Router/scale"))
            else:
                gate = take(moe + "Router/dense/kernel")
                state[dst + "mlp.router.gate.weight"] = _tensor(gate.reshape(width, -1).T)
        else:
            for j, fc in ((0, "fc1"), (1, "fc2")):
                state[dst + f"mlp.{fc}.weight"] = _tensor(take(src + f"Mlp/Dense_{j}/kernel").T)
                state[dst + f"mlp.{fc}.bias"] = _tensor(take(src + f"Mlp/Dense_{j}/bias"))
    unknown = sorted(set(arrays) - used)
    if unknown:
        raise ValueError(f"vmoe checkpoint: parameters moezoo cannot map: {unknown[:10]}")
    return state


def from_vmoe_checkpoint(
    prefix: str | os.PathLike,
    *,
    k: int | None = None,
    group_images: int | None = None,
    group_size: int | None = None,
    capacity_factor: float | None = None,
    batch_priority: bool = True,
    capacity_multiple_of: int = 4,
    bfloat16_dispatch: bool = False,
    img_size: int | None = None,
    ensemble_size: int | None = None,
) -> VisionTransformerMoE | SoftMoEVisionTransformer:
    """A vmoe checkpoint (``<prefix>.index`` + ``<prefix>.data-*``) as a moezoo model, in eval mode.

    ``forward`` takes NCHW float images in [-1, 1]. A V-MoE checkpoint returns a
    :class:`VisionTransformerMoE` (E^3 with ``ensemble_size`` members, or when its router kernels
    are stored per member); a Soft MoE one (``Router/mu``) a :class:`SoftMoEVisionTransformer`.

    Args:
        prefix: a local prefix, or ``gs://``/``https://``/``file://`` (downloaded once into the
            zoo's URL cache).
        k: experts per token (vmoe's ``num_selected_experts``). V-MoE: required.
        group_images: images per routing group (vmoe's ``group_size`` / tokens per image; 8 in
            the released configs), or ``group_size``: tokens per group. V-MoE: one is required.
        capacity_factor: C used in training and evaluation (released configs evaluate at 4.0 or
            1.5). V-MoE: required.
        batch_priority: Batch Prioritized Routing (the released configs trained without it).
        capacity_multiple_of: capacity rounded up to a multiple of this (4 in every config).
        bfloat16_dispatch: expert inputs and outputs rounded to bfloat16, as vmoe's
            ``dispatcher.bfloat16`` (on in every released config; always on in vmoe's Soft MoE).
        img_size: input resolution (default: the checkpoint's); position embeddings are resized
            as vmoe's ``vit_zoom`` does.
        ensemble_size: E^3 members, for a checkpoint whose router kernels are stored as (D, E).

    Raises:
        ValueError: a routing setting a V-MoE checkpoint needs is missing (named), a setting is
            given that a Soft MoE checkpoint does not take, or a parameter cannot be mapped.
        CheckpointError: the files are missing, damaged or not a vmoe checkpoint.
    """
    builder, kwargs, state = _convert(prefix, img_size=img_size, ensemble_size=ensemble_size)
    kwargs.update(_routing(builder, k=k, group_images=group_images, group_size=group_size,
                           capacity_factor=capacity_factor, batch_priority=batch_priority,
                           capacity_multiple_of=capacity_multiple_of, bfloat16_dispatch=bfloat16_dispatch))
    model = builder(**kwargs)
    model.load_state_dict(state)
    return model.eval()


def _convert(prefix: str | os.PathLike, *, img_size: int | None, ensemble_size: int | None):
    arrays = read_vmoe_checkpoint(fetch_vmoe_checkpoint(prefix))
    builder, kwargs = vmoe_architecture(arrays, img_size=img_size, ensemble_size=ensemble_size)
    return builder, kwargs, vmoe_state_dict(arrays, img_size=img_size, ensemble_size=ensemble_size)


def _routing(builder: type[nn.Module], *, k, group_images, group_size, capacity_factor, batch_priority,
             capacity_multiple_of, bfloat16_dispatch) -> dict[str, Any]:
    """The constructor's routing arguments, checked against what the checkpoint's kind takes."""
    precision = {"bfloat16_dispatch": bool(bfloat16_dispatch)}
    if builder is SoftMoEVisionTransformer:
        given = {n: v for n, v in (("k", k), ("group_images", group_images), ("group_size", group_size),
                                   ("capacity_factor", capacity_factor)) if v is not None}
        if given:
            raise ValueError(f"a Soft MoE checkpoint routes every image as one group with all slots; "
                             f"{sorted(given)} do not apply")
        return precision
    if k is None:
        raise ValueError("a V-MoE checkpoint needs k (vmoe's num_selected_experts; 2 for V-MoE, 1 for E^3 releases)")
    if group_images is None and group_size is None:
        raise ValueError("a V-MoE checkpoint needs group_images (images per routing group, 8 in the released "
                         "configs) or group_size (tokens per group)")
    if capacity_factor is None:
        raise ValueError("a V-MoE checkpoint needs capacity_factor (the released configs evaluate at 4.0 or 1.5)")
    return dict(k=k, group_images=group_images, group_size=group_size, capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor, batch_priority=batch_priority,
                capacity_multiple_of=capacity_multiple_of, **precision)


def zoo_weights(cfg: PretrainedCfg) -> Path:
    """The :class:`PretrainedCfg` converter of the vmoe zoo entries: fetch ``cfg.source``
    (``url:<prefix URL>``), convert it once to ``model.safetensors`` in the URL cache and return
    that file. The downloaded shards are removed after a successful conversion; a failed one
    writes nothing (the write is atomic) and keeps the downloads for the next try."""
    url = cfg.source.split(":", 1)[1]
    target = url_cache_path(url).parent / "model.safetensors"
    if target.is_file():
        return target
    prefix = fetch_vmoe_checkpoint(url)
    save_checkpoint(vmoe_state_dict(read_vmoe_checkpoint(prefix)), target, metadata={"source": url})
    shard_count, _ = read_index(prefix)
    for path in [Path(f"{prefix}.index"), *shard_paths(prefix, shard_count)]:
        path.unlink()
    return target


def convert_vmoe_checkpoint(source: str, directory: str | os.PathLike, **routing: Any) -> Path:
    """Write a vmoe checkpoint as an exported moezoo folder (``config.json``, ``model.safetensors``,
    ``README.md``) that ``moezoo.create_model(checkpoint_path=directory)`` loads.

    Args:
        source: a vmoe zoo entry name (its routing settings and card come with it; ``routing``
            overrides them), or a checkpoint prefix as :func:`from_vmoe_checkpoint` takes it
            (exported as the generic entry of its class, :data:`GENERIC_ENTRIES`).
        routing: :func:`from_vmoe_checkpoint`'s keyword arguments; None means not given.
    """
    if source in list_models():
        entry = get_entry(source)
        if entry.pretrained_cfg is None or entry.pretrained_cfg.converter != f"{__name__}:zoo_weights":
            raise ValueError(f"{source!r} is not a vmoe checkpoint entry")
        model = create_model(source, pretrained=True, **_routing_overrides(routing))
        path = card_path(source)
        return export_model(model, directory, card=path.read_text() if path.is_file() else None)
    img_size, ensemble_size = routing.pop("img_size", None), routing.pop("ensemble_size", None)
    builder, kwargs, state = _convert(source, img_size=img_size, ensemble_size=ensemble_size)
    given = {k: v for k, v in routing.items() if v is not None}
    unknown = sorted(set(given) - set(_ROUTING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown routing options {unknown}; allowed: {sorted(_ROUTING_DEFAULTS)}")
    kwargs.update(_routing(builder, **{**_ROUTING_DEFAULTS, **given}))
    model = create_model(GENERIC_ENTRIES[builder], **kwargs)
    model.load_state_dict(state)
    card = "\n".join([
        f"# {Path(os.fspath(source)).name}", "",
        f"google-research/vmoe checkpoint `{os.fspath(source)}`, converted by `moezoo zoo convert vmoe`.", "",
        f"Built by `{builder.__module__}.{builder.__qualname__}` with:", "", "```json",
        json.dumps(kwargs, indent=2, sort_keys=True), "```", "",
        "Results: not measured here.", "",
    ])
    return export_model(model, directory, card=card)


_ROUTING_DEFAULTS = dict(k=None, group_images=None, group_size=None, capacity_factor=None, batch_priority=True,
                         capacity_multiple_of=4, bfloat16_dispatch=False)


def _routing_overrides(routing: dict[str, Any]) -> dict[str, Any]:
    """Constructor overrides for a zoo entry from the given (non-None) routing options."""
    out = {k: v for k, v in routing.items() if v is not None and k in _ROUTING_DEFAULTS}
    if "capacity_factor" in out:
        out["eval_capacity_factor"] = out["capacity_factor"]
    if "group_size" in out:
        out["group_images"] = None
    for fixed in ("img_size", "ensemble_size"):
        if routing.get(fixed) is not None:
            raise ValueError(f"{fixed} is part of a zoo entry's architecture; convert its prefix instead")
    return out
