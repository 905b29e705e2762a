"""moezoo's vision entries in timm's terms: their ``pretrained_cfg``, the adaptation of published
weights to other heads, channels and sizes, ``features_only``, timm's hub config, and
registration with timm's model registry.

After ``import moezoo`` every vision entry is a timm model: ``timm.create_model("vmoe_ti_digits",
pretrained=True)``, ``timm.list_models("vmoe*")``, ``timm.list_pretrained()``, and timm's data
config (``timm.data.resolve_data_config(model=...)``) and hub tools (``timm.models.push_to_hub``,
``timm.create_model("local-dir:<folder>")``) work on them. The entrypoints sit in timm's module
namespace ``timm_models`` (``timm.list_models(module="timm_models")``); an entry whose name timm
already uses is registered with timm as ``moezoo_<name>``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import PretrainedCfg as TimmPretrainedCfg
from timm.models import adapt_input_conv
from timm.models import register_model as timm_register_model
from torch import Tensor, nn

from moezoo.zoo.registry import ModelEntry, create_model

__all__ = [
    "TIMM_NAMES",
    "default_cfgs",
    "hub_config",
    "pretrained_filter",
    "register_with_timm",
    "timm_cfg",
    "vision_features",
]

#: timm's ViT layout: the stem whose input channels follow ``in_chans``, and the classifier.
FIRST_CONV, CLASSIFIER = "patch_embed.proj", "head"

#: vmoe's preprocessing (``value_range(-1, 1)``), for entries whose weights state none.
_VMOE_INPUT = {"mean": 0.5, "std": 0.5, "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}


def timm_cfg(args: Mapping[str, Any], input_spec: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` fields of a ViT entry built with ``args``: ``input_size`` (channels,
    image size), the normalisation and resizing of ``input_spec`` (vmoe's when absent), the class
    count, the stem and the classifier; then ``fields``."""
    spec = {**_VMOE_INPUT, **(input_spec or {})}
    channels, size = args.get("in_chans", 3), args.get("img_size", 224)
    height, width = (size, size) if isinstance(size, int) else size

    def per_channel(value: float | Sequence[float]) -> tuple[float, ...]:
        return tuple(value) if isinstance(value, Sequence) else (float(value),) * channels

    return {
        "input_size": (channels, height, width),
        "fixed_input_size": not args.get("dynamic_img_size", False),
        "interpolation": spec["interpolation"],
        "crop_pct": spec["crop_pct"],
        "crop_mode": spec["crop_mode"],
        "mean": per_channel(spec["mean"]),
        "std": per_channel(spec["std"]),
        "num_classes": args.get("num_classes", 1000),
        "first_conv": FIRST_CONV,
        "classifier": CLASSIFIER,
        **fields,
    }


def pretrained_filter(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Published ViT weights adapted to ``model`` as timm's ``load_pretrained`` and ViT
    ``checkpoint_filter_fn`` adapt them (at load time; the modules have no hooks for it):

    - another patch size: the patch kernels resampled (``resample_patch_embed``);
    - other input channels: the stem summed or repeated over them (``adapt_input_conv``; a
      one-channel stem repeated and divided by the channel count);
    - another image size: ``pos_embed`` resampled to the model's grid (``resample_abs_pos_embed``);
      V-MoE's routing groups follow by themselves (they count images, see ``VisionMoE``);
    - another class count: the model's freshly initialised head kept (no head with ``num_classes=0``).
    """
    own = model.state_dict()
    out = dict(state)
    stem = f"{FIRST_CONV}.weight"
    if stem in out and stem in own:
        weight = out[stem]
        if weight.shape[-2:] != own[stem].shape[-2:]:
            weight = resample_patch_embed(weight, list(own[stem].shape[-2:]))
        channels = own[stem].shape[1]
        if weight.shape[1] == 1 and channels > 1:
            # timm's adapt_input_conv assumes RGB weights; a grey stem sees every channel equally
            # (so a grey image gives the same features in any channel count).
            weight = weight.repeat(1, channels, 1, 1) / channels
        elif weight.shape[1] != channels:
            weight = adapt_input_conv(channels, weight)
        out[stem] = weight
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                  num_prefix_tokens=prefix)
    for key in [k for k in out if k.startswith(f"{CLASSIFIER}.")]:
        if key not in own:
            del out[key]
        elif out[key].shape != own[key].shape:
            out[key] = own[key]
    return out


def _feature_classes() -> dict[str, type[nn.Module]]:
    from timm.models._features import FeatureGetterNet, FeatureHookNet
    from timm.models._features_fx import FeatureGraphNet

    return {"getter": FeatureGetterNet, "hook": FeatureHookNet, "fx": FeatureGraphNet}


def vision_features(model: nn.Module, out_indices: int | Sequence[int] = 3,
                    feature_cls: str | type[nn.Module] = "getter", **feature_kwargs: Any) -> nn.Module:
    """timm's ``features_only`` for a ViT (timm's ViT defaults: the last 3 blocks' outputs, through
    ``forward_intermediates``): ``model(x) -> [(B, width, H/p, W/p)] * len(out_indices)``.
    ``feature_cls`` "fx" traces the model with the routed layers as leaf modules."""
    classes = _feature_classes()
    if isinstance(feature_cls, str):
        if feature_cls.lower() not in classes:
            raise ValueError(f"feature_cls must be one of {sorted(classes)} or a timm feature class, got {feature_cls!r}")
        feature_cls = classes[feature_cls.lower()]
    return feature_cls(model, out_indices=out_indices, **feature_kwargs)


def hub_config(model: nn.Module) -> dict[str, Any]:
    """timm's hub ``config.json`` of ``model`` (``architecture``, ``num_classes``, ``num_features``,
    ``global_pool``, ``pretrained_cfg``, ``model_args``), as ``timm.models.save_for_hf`` writes it."""
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, path, model_args=dict(getattr(model, "moezoo_args", {})))
        return json.loads(path.read_text())


#: moezoo entry name -> the name it has in timm's registry.
TIMM_NAMES: dict[str, str] = {}
#: timm reads an entrypoint module's ``default_cfgs`` (timm's ``PretrainedCfg`` fields) when it
#: registers the entrypoint.
default_cfgs: dict[str, dict[str, Any]] = {}
_TIMM_FIELDS = {f.name for f in dataclasses.fields(TimmPretrainedCfg)}


def _entrypoint(name: str, timm_name: str, description: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Mapping[str, Any] | str | None = None,
                   pretrained_cfg_overlay: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                   pretrained_model_args: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        # timm.create_model("local-dir:<folder>" / "hf-hub:<repo>") hands over the folder's own
        # pretrained_cfg: those weights, not the entry's, are the ones to load.
        source = pretrained_cfg.get("source") if isinstance(pretrained_cfg, Mapping) else None
        if pretrained and source in ("local-dir", "hf-hub"):
            folder = pretrained_cfg.get("file") if source == "local-dir" else _hub_folder(pretrained_cfg, cache_dir)
            model = create_model(name, checkpoint_path=folder, **kwargs)
            model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **pretrained_cfg,
                                                        **(pretrained_cfg_overlay or {})}
            return model
        if isinstance(pretrained_cfg, Mapping) and pretrained_cfg.get("architecture") == timm_name:
            pretrained_cfg = {**pretrained_cfg, "architecture": name}
        return create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"moezoo's {name!r}: {description}"
    return entrypoint


def _hub_folder(pretrained_cfg: Mapping[str, Any], cache_dir: str | None) -> Path:
    from moezoo.zoo.hub import hub_download

    hub_kwargs = {} if cache_dir is None else {"cache_dir": cache_dir}
    return hub_download(pretrained_cfg["hf_hub_id"], allow_patterns=["*.json", "*.safetensors"], **hub_kwargs)


def register_with_timm(entries: Sequence[ModelEntry]) -> dict[str, str]:
    """Register vision entries with timm's registry, once each; returns :data:`TIMM_NAMES`."""
    for entry in entries:
        if entry.name in TIMM_NAMES:
            continue
        timm_name = entry.name if not timm.is_model(entry.name) else f"moezoo_{entry.name}"
        cfg = {k: v for k, v in entry.model_pretrained_cfg().items() if k in _TIMM_FIELDS}
        default_cfgs[timm_name] = {**cfg, "architecture": timm_name}
        TIMM_NAMES[entry.name] = timm_name
        timm_register_model(_entrypoint(entry.name, timm_name, entry.description))
    return TIMM_NAMES
