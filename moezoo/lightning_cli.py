"""moezoo's LightningCLI: the parser behind ``moezoo fit/validate/test/predict`` and every tool that
reads a run's config."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

__all__ = ["MoezooCLI"]


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
