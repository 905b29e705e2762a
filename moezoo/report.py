"""Routing reports: run a trained model over data and write a self-contained report (HTML with
embedded PNGs, the PNGs and a JSON of the numbers); ``moezoo routing-report`` is its command."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from moezoo.layers.routed import routed_layers
from moezoo.monitoring import layer_statistics, load_heatmap
from moezoo.routers.base import Router

__all__ = ["RoutingRecorder", "routing_report"]


class RoutingRecorder:
    """Collects, over many batches, what every routed layer's router decided.

    Per layer: tokens per expert, the mean of each scalar statistic, and the ``top`` highest-weight
    assignments per expert as (weight, batch index, token index).
    """

    def __init__(self, model: nn.Module, top: int = 6) -> None:
        self.layers = routed_layers(model)
        self.top = top
        self.counts: dict[str, Tensor] = {}
        self.modality_counts: dict[str, dict[str, Tensor]] = {}
        self.scalars: dict[str, dict[str, list[float]]] = {}
        self.best: dict[str, list[list[tuple[float, int, int]]]] = {}
        self.batch = 0
        # One entry per router: a layer's name, or "<layer>.<router>" where a layer routes twice
        # (SwitchHead selects value and output experts separately).
        self.routers: list[tuple[str, str]] = []  # (router key, layer name)
        self._handles = []
        for name, layer in self.layers:
            routers = [(n, m) for n, m in layer.named_modules() if isinstance(m, Router)]
            for child, router in routers:
                key = name if len(routers) == 1 else f"{name}.{child}"
                self.routers.append((key, name))
                self._handles.append(router.register_forward_hook(self._hook(key)))

    def _hook(self, name: str):
        def record(module, args, routing) -> None:
            counts = torch.bincount(routing.expert.detach().cpu(), minlength=routing.num_experts).float()
            self.counts[name] = self.counts.get(name, torch.zeros_like(counts)) + counts
            best = self.best.setdefault(name, [[] for _ in range(routing.num_experts)])
            weight, token, expert = (t.detach().cpu() for t in (routing.weight, routing.token, routing.expert))
            for e in range(routing.num_experts):
                mine = expert == e
                if mine.any():
                    w, idx = torch.topk(weight[mine].float(), min(self.top, int(mine.sum())))
                    best[e] = sorted(best[e] + [(float(v), self.batch, int(token[mine][i])) for v, i in zip(w, idx)],
                                     reverse=True)[: self.top]
        return record

    def after_layers(self) -> None:
        """Call after each batch: folds every layer's scalar statistics in."""
        for name, layer in self.layers:
            for key, value in layer_statistics(layer.last_stats, layer.last_losses).items():
                self.scalars.setdefault(name, {}).setdefault(key, []).append(value)
            for key, counts in layer.last_stats.items():
                if key.endswith("/tokens_per_expert"):  # multimodal layers: per-modality loads
                    per = self.modality_counts.setdefault(name, {})
                    modality = key.split("/")[0]
                    per[modality] = per.get(modality, torch.zeros_like(counts)) + counts.cpu()
        self.batch += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def summary(self) -> dict:
        out = {}
        for key, name in self.routers:
            counts = self.counts.get(key)
            if counts is None:
                continue
            share = counts / counts.sum().clamp_min(1e-12)
            out[key] = {
                "tokens_per_expert": counts.tolist(),
                "share_per_expert": share.tolist(),
                **{k: sum(v) / len(v) for k, v in self.scalars.get(name, {}).items()},
            }
            if name in self.modality_counts:
                out[key]["modality_share_per_expert"] = {
                    m: (c / c.sum().clamp_min(1e-12)).tolist() for m, c in self.modality_counts[name].items()
                }
        return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _drops_figure(summary: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    values = [summary[n].get("dropped_fraction", 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.0), dpi=110)
    ax.bar(range(len(names)), values, color="tab:red")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("dropped fraction")
    ax.set_title("assignments dropped by capacity, per layer", fontsize=9)
    fig.tight_layout()
    return fig


def _modality_figure(summary: dict):
    """Per multimodal layer: each modality's share of its tokens per expert, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n, s in summary.items() if "modality_share_per_expert" in s]
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 2.8), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], layers):
        shares = summary[name]["modality_share_per_expert"]
        width = 0.8 / len(shares)
        for i, (modality, values) in enumerate(sorted(shares.items())):
            ax.bar([e + (i - (len(shares) - 1) / 2) * width for e in range(len(values))], values, width=width,
                   label=modality)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("share of the modality's tokens", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _top_patches_figure(name: str, best, images: list[Tensor], tokens_per_image: int, prefix: int, patch: int):
    """Per expert, the images whose patch it weighted highest, with that patch outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    experts, top = len(best), max((len(b) for b in best), default=0)
    if top == 0:
        return None
    fig, axes = plt.subplots(experts, top, figsize=(1.1 * top, 1.1 * experts), dpi=100, squeeze=False)
    for e in range(experts):
        for j in range(top):
            ax = axes[e][j]
            ax.axis("off")
            if j >= len(best[e]):
                continue
            weight, batch, token = best[e][j]
            if token // tokens_per_image >= images[batch].shape[0]:
                continue  # a token of another modality (multimodal layers route image tokens first)
            image = images[batch][token // tokens_per_image]
            pixels = image.float()
            pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-6)
            ax.imshow(pixels.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if pixels.shape[0] == 1 else None)
            position = token % tokens_per_image - prefix
            if position >= 0:
                grid = image.shape[-1] // patch
                r, c = divmod(position, grid)
                ax.add_patch(mpatches.Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch,
                                                fill=False, edgecolor="red", linewidth=1.5))
            if j == 0:
                ax.set_title(f"expert {e}", fontsize=6, loc="left")
    fig.suptitle(f"{name}: top patches per expert", fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def routing_report(model: nn.Module, batches, out_dir: str | Path, *, title: str = "routing report",
                   max_batches: int | None = None, run_batch=None) -> dict:
    """Route ``batches`` through ``model`` and write ``report.html``, ``report.json`` and PNGs to
    ``out_dir``. Returns the JSON record.

    Args:
        run_batch: ``(batch, index) -> anything`` that runs the model on one batch (a task's
            ``predict_step``); default ``model(batch[0])``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    recorder = RoutingRecorder(model)
    kept_inputs: list[Tensor] = []
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            if run_batch is None:
                model(first)
            else:
                run_batch(batch, i)
            recorder.after_layers()
            if isinstance(first, Tensor) and first.dim() == 4:
                kept_inputs.append(first.cpu())
    finally:
        recorder.close()
    summary = recorder.summary()
    if not summary:
        raise ValueError("routing_report: the model has no routed layer that routed any token")

    pictures: dict[str, bytes] = {}
    names = list(summary)
    shares = [torch.tensor(summary[n]["share_per_expert"]) for n in names]
    pictures["load_heatmap.png"] = _png(load_heatmap(shares, names, "share of tokens per expert"))
    pictures["dropped_fraction.png"] = _png(_drops_figure(summary))
    modality_figure = _modality_figure(summary)
    if modality_figure is not None:
        pictures["modality_share_per_expert.png"] = _png(modality_figure)
    patch_embed = getattr(model, "patch_embed", None)
    if kept_inputs and patch_embed is not None:
        tokens_per_image = patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)
        patch = patch_embed.patch_size[0]
        for name in (names[0], names[-1]):
            fig = _top_patches_figure(name, recorder.best[name], kept_inputs, tokens_per_image,
                                      getattr(model, "num_prefix_tokens", 0), patch)
            if fig is not None:
                pictures[f"top_patches_{name.replace('.', '_')}.png"] = _png(fig)
    for file, data in pictures.items():
        (out / file).write_bytes(data)

    record = {"title": title, "batches": recorder.batch, "layers": summary, "images": sorted(pictures)}
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(f"<td>{summary[n].get(k, float('nan')):.4f}</td>" for k in ("load_cv", "load_max_over_mean",
                                                                             "dropped_fraction", "entropy"))
        + "</tr>"
        for n in names
    )
    images = "".join(
        f"<h2>{html.escape(f)}</h2><img alt='{html.escape(f)}' src='data:image/png;base64,"
        f"{base64.b64encode(d).decode()}'/>"
        for f, d in pictures.items()
    )
    (out / "report.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{recorder.batch} batches.</p>"
        "<table border='1'><tr><th>layer</th><th>load CV</th><th>max/mean load</th><th>dropped fraction</th>"
        f"<th>router entropy</th></tr>{rows}</table>{images}</body></html>\n"
    )
    return record
