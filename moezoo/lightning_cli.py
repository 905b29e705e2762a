"""moezoo's LightningCLI: the parser behind ``moezoo fit/validate/test/predict`` and every tool that
reads a run's config."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["MoezooArgumentParser", "MoezooCLI"]

_NO_DEFAULT = inspect.Parameter.empty


def _default(cls: type, name: str) -> Any:
    """The default of ``cls``'s constructor argument ``name``, following ``**kwargs`` up its bases."""
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return inspect.signature(init).parameters[name].default
    return _NO_DEFAULT


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _drop_class_defaults(value: Any) -> None:
    """Remove, in place, every constructor argument whose value is a class and the signature's
    default. Printed as an import path, such a default does not read back as itself: for timm's
    ``VisionTransformer(embed_layer: Callable = PatchEmbed)`` jsonargparse reads a class path as a
    class to instantiate (the model would get a ``PatchEmbed`` module), for ``attn_layer:
    Union[str, Callable, ...] = Attention`` as the string. Left out, the default applies again."""
    if isinstance(value, list):
        for item in value:
            _drop_class_defaults(item)
        return
    if not isinstance(value, Namespace):
        return
    init_args = value.get("init_args")
    cls = _import(value["class_path"]) if isinstance(value.get("class_path"), str) else None
    if cls is not None and isinstance(init_args, Namespace):
        for key, item in list(vars(init_args).items()):
            if inspect.isclass(item) and item is _default(cls, key):
                init_args.pop(key)
    for item in vars(value).values():
        _drop_class_defaults(item)


class MoezooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose printed and saved configs (``--print_config``, a run's
    ``config.yaml``) read back as the same configuration (see :func:`_drop_class_defaults`)."""

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        namespace = namespace.clone()
        _drop_class_defaults(namespace)
        return super().dump(namespace, *args, **kwargs)


class MoezooCLI(LightningCLI):
    """LightningCLI with moezoo's defaults: any LightningModule / LightningDataModule by
    ``class_path``, OmegaConf interpolation in configs, and Rich's progress bar."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        kwargs["parser_kwargs"] = parser_kwargs
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", MoezooArgumentParser)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Rich's progress bar and a summary with active parameters by default, unless the config
        # turns them off or brings its own.
        from moezoo.monitoring import MoEModelSummary

        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, RichProgressBar()]
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in configured
        ):
            callbacks = [*callbacks, MoEModelSummary()]
        return super()._instantiate_trainer(config, callbacks)
