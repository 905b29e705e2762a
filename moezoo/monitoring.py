"""Routing health during training: per-layer statistics, expert-load heatmaps, dead-expert warnings,
and a model summary with active parameters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichModelSummary
from torch import Tensor

from moezoo.layers.routed import parameter_counts, routed_layers

__all__ = ["MoEModelSummary", "RoutingMonitor", "layer_statistics", "load_heatmap"]

log = logging.getLogger("moezoo")


def layer_statistics(stats: dict[str, Tensor], losses: dict[str, Tensor]) -> dict[str, float]:
    """Scalar summaries of one layer's routing: share of tokens per expert, load CV, max/mean load,
    drops, entropy, losses.

    Args:
        stats: the layer's ``last_stats`` (``tokens_per_expert`` (E,), ``dropped_fraction``, ...).
        losses: the layer's ``last_losses``.
    """
    out: dict[str, float] = {}
    if "tokens_per_expert" in stats:
        load = stats["tokens_per_expert"].float()
        mean = load.mean().clamp_min(1e-12)
        out["load_cv"] = (load.std(unbiased=False) / mean).item()
        out["load_max_over_mean"] = (load.max() / mean).item()
        share = load / load.sum().clamp_min(1e-12)
        out.update({f"share/expert_{e:02d}": float(v) for e, v in enumerate(share.tolist())})
    for key in ("dropped_fraction", "unrouted_fraction", "entropy"):
        if key in stats:
            out[key] = float(stats[key])
    for key, value in losses.items():
        out[f"loss/{key}"] = float(value.detach())
    return out


def load_heatmap(shares: Tensor | Sequence[Tensor], layer_names: list[str], title: str):
    """A matplotlib figure of each layer's share of tokens per expert.

    Args:
        shares: (layers, experts), or one (experts_i,) row per layer when layers have different
            numbers of experts (a row is left blank past its layer's experts).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [torch.as_tensor(r, dtype=torch.float32).flatten() for r in shares]
    layers, experts = len(rows), max(r.numel() for r in rows)
    grid = np.full((layers, experts), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        grid[i, : r.numel()] = r.numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * experts + 2.5), max(2.2, 0.45 * layers + 1.4)), dpi=110)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(layers), layer_names, fontsize=7)
    ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7 if experts <= 32 else 5)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of tokens")
    fig.tight_layout()
    return fig


class RoutingMonitor(Callback):
    """Logs every ``every_n_steps`` training steps, per routed layer: tokens-per-expert shares,
    coefficient of variation of the load, max/mean load, dropped and unrouted fractions, router
    entropy and each auxiliary loss; draws a (layers x experts) load heatmap to TensorBoard (when
    the logger is TensorBoard) and as PNG files under ``<log dir>/routing/``; warns once when an
    expert received no token for ``dead_after`` consecutive training steps. Validation statistics
    are logged per epoch, accumulated over the epoch.

    Every moezoo task adds one by default (see ``MoETask.configure_callbacks``).
    """

    def __init__(self, every_n_steps: int = 50, dead_after: int = 100, heatmaps: bool = True) -> None:
        if every_n_steps < 1 or dead_after < 1:
            raise ValueError(f"every_n_steps and dead_after must be >= 1, got {every_n_steps}, {dead_after}")
        self.every_n_steps, self.dead_after, self.heatmaps = every_n_steps, dead_after, heatmaps
        self._idle: dict[str, Tensor] = {}
        self._warned: set[tuple[str, int]] = set()
        self._val_counts: dict[str, Tensor] = {}
        self.heatmap_files: list[Path] = []

    # -- training --------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        layers = routed_layers(pl_module)
        if not layers:
            return
        # Each rank routes its own batch: an expert is dead only if no rank sent it a token.
        counts = {n: layer.last_stats.get("tokens_per_expert") for n, layer in layers}
        if trainer.world_size > 1:
            counts = {n: None if c is None else trainer.strategy.reduce(c.float(), reduce_op="sum")
                      for n, c in counts.items()}
        self._track_dead(counts, trainer.global_step)
        if trainer.global_step % self.every_n_steps:
            return
        self._log_layers(pl_module, layers, "train", on_step=True)
        if self.heatmaps:
            self._heatmap(trainer, layers, counts, "train")

    def _track_dead(self, all_counts: dict[str, Tensor | None], step: int) -> None:
        for name, counts in all_counts.items():
            if counts is None:
                continue
            idle = self._idle.get(name, torch.zeros_like(counts))
            idle = torch.where(counts > 0, torch.zeros_like(idle), idle + 1)
            self._idle[name] = idle
            for expert in (idle >= self.dead_after).nonzero().flatten().tolist():
                if (name, expert) not in self._warned:
                    self._warned.add((name, expert))
                    log.warning(
                        "moezoo: expert %d of layer %s received no token for %d consecutive training steps "
                        "(step %d): it is dead; consider a larger balancing-loss weight or capacity",
                        expert, name, self.dead_after, step,
                    )

    def _log_layers(self, pl_module: L.LightningModule, layers, stage: str, on_step: bool) -> None:
        for name, layer in layers:
            for key, value in layer_statistics(layer.last_stats, layer.last_losses).items():
                pl_module.log(f"routing_{stage}/{name}/{key}", value, on_step=on_step, on_epoch=not on_step,
                              batch_size=1, sync_dist=True)

    # -- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_counts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        layers = routed_layers(pl_module)
        self._log_layers(pl_module, layers, "val", on_step=False)
        for name, layer in layers:
            counts = layer.last_stats.get("tokens_per_expert")
            if counts is not None:
                self._val_counts[name] = self._val_counts.get(name, torch.zeros_like(counts)) + counts

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.heatmaps and self._val_counts and not trainer.sanity_checking:
            # Every rank routed its own share of the data: the picture shows all of them.
            counts = {n: trainer.strategy.reduce(c, reduce_op="sum") for n, c in sorted(self._val_counts.items())}
            self._heatmap(trainer, routed_layers(pl_module), counts, "val")

    # -- pictures ----------------------------------------------------------------------------
    def _heatmap(self, trainer: L.Trainer, layers, counts: dict[str, Tensor | None], stage: str) -> None:
        # trainer.log_dir is a broadcast under DDP: every rank must ask for it, or rank 0 waits forever.
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "routing"
        if trainer.is_global_zero:
            self._draw_heatmap(trainer, directory, layers, counts, stage)

    def _draw_heatmap(self, trainer: L.Trainer, directory: Path, layers, counts: dict[str, Tensor | None],
                      stage: str) -> None:
        rows, names = [], []
        for name, _ in layers:
            c = counts.get(name)
            if c is None:
                continue
            rows.append(c.float().cpu() / c.float().sum().clamp_min(1e-12))
            names.append(name)
        if not rows:
            return
        import matplotlib.pyplot as plt

        step = trainer.global_step
        fig = load_heatmap(rows, names, f"{stage} expert load, step {step}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stage}_load_step{step:07d}.png"
        fig.savefig(path)
        self.heatmap_files.append(path)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"routing_{stage}/expert_load", fig, global_step=step)
        plt.close(fig)


class MoEModelSummary(RichModelSummary):
    """Lightning's rich model summary plus the parameters active per token (routed experts count k/E)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:
            counts = parameter_counts(pl_module)
            from rich import get_console

            get_console().print(
                f"[bold]Active params per token[/]: {counts['active']:,} of {counts['total']:,} "
                f"({counts['active'] / max(counts['total'], 1):.1%})"
            )

