"""The ``moezoo`` command: LightningCLI (fit/validate/test/predict) plus ``moezoo zoo ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

__all__ = ["MoezooCLI", "main"]


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
        # Rich's progress bar by default, unless the config turns bars off or brings its own.
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def _zoo_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from moezoo.zoo import get_entry, list_models

    parser = argparse.ArgumentParser(prog="moezoo zoo", description="Browse the model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="print the registry as a table")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern")
    ls.add_argument("--pretrained", action="store_true", help="only entries with weights")
    args = parser.parse_args(list(argv))

    table = Table(title="moezoo models")
    for column in ("name", "modality", "pretrained source", "description"):
        table.add_column(column)
    for name in list_models(args.pattern, pretrained=args.pretrained):
        entry = get_entry(name)
        source = entry.pretrained_cfg.source if entry.pretrained_cfg else "-"
        table.add_row(name, entry.modality, source, entry.description)
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moezoo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "zoo":
        return _zoo_main(args[1:])
    # LightningCLI reads sys.argv itself; pass args only when called from Python.
    MoezooCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
