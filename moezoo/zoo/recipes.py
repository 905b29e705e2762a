"""Fine-tuning recipes as Lightning callbacks (configs in ``configs/recipes/``).

List them in ``trainer.callbacks`` in the order they should apply: load weights first, then change
the architecture (upcycling), then freeze. Each acts in ``setup``, before the optimiser is built, so
frozen parameters get no optimiser state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from moezoo.layers.experts import Experts
from moezoo.layers.routed import routed_layers
from moezoo.routers.base import set_routing

__all__ = [
    "BranchTrainMix",
    "EvalCapacity",
    "ExpertDropout",
    "ExpertSpecialisedFineTuning",
    "FreezeDense",
    "FreezeMoE",
    "LoadWeights",
    "SparseUpcycling",
]


def _model(pl_module: L.LightningModule) -> nn.Module:
    return getattr(pl_module, "model", pl_module)


def _routed_parameters(model: nn.Module) -> set[int]:
    return {id(p) for _, layer in routed_layers(model) for p in layer.parameters()}


class LoadWeights(Callback):
    """Load a zoo entry's published weights, or a checkpoint, into the task's model before training.

    Args:
        entry: zoo entry name (its ``pretrained_cfg``, hash-checked).
        checkpoint: a safetensors file/folder or a ``moezoo fit`` ``.ckpt`` instead.
    """

    def __init__(self, entry: str | None = None, checkpoint: str | None = None) -> None:
        if (entry is None) == (checkpoint is None):
            raise ValueError("LoadWeights needs exactly one of entry=<zoo name> or checkpoint=<path>")
        self.entry, self.checkpoint = entry, checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from moezoo.zoo.checkpoint import load_checkpoint
        from moezoo.zoo.registry import load_pretrained

        if self.checkpoint is not None:
            load_checkpoint(_model(pl_module), self.checkpoint)
        else:
            load_pretrained(_model(pl_module), self.entry)


class FreezeMoE(Callback):
    """Freeze every parameter inside routed layers (experts and routers); train the rest.

    ST-MoE (Zoph et al. 2022) found fine-tuning only the non-MoE parameters works about as well and
    saves memory.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        routed = _routed_parameters(_model(pl_module))
        for p in _model(pl_module).parameters():
            if id(p) in routed:
                p.requires_grad_(False)


class FreezeDense(Callback):
    """The opposite of :class:`FreezeMoE`: train only the routed layers, freeze everything else."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        routed = _routed_parameters(_model(pl_module))
        for p in _model(pl_module).parameters():
            if id(p) not in routed:
                p.requires_grad_(False)


class ExpertDropout(Callback):
    """Dropout inside the experts, higher than elsewhere (ST-MoE fine-tuning: 0.4 in experts, 0.1 elsewhere)."""

    def __init__(self, rate: float = 0.4) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ExpertDropout: rate must be in [0, 1), got {rate}")
        self.rate = rate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for module in _model(pl_module).modules():
            if isinstance(module, Experts):
                module.dropout = self.rate


class EvalCapacity(Callback):
    """Evaluate with another capacity ratio and/or BPR setting (V-MoE and Switch practice)."""

    def __init__(self, capacity_factor: float | None = None, batch_priority: bool | None = None) -> None:
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"EvalCapacity: capacity_factor must be > 0, got {capacity_factor}")
        self.capacity_factor, self.batch_priority = capacity_factor, batch_priority

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_routing(_model(pl_module), eval_capacity_factor=self.capacity_factor, batch_priority=self.batch_priority)


class SparseUpcycling(Callback):
    """Turn the task's dense timm ViT into a V-MoE in place, every expert a copy of its MLP
    (Komatsuzaki et al. 2022); put :class:`LoadWeights` with the dense checkpoint before it.

    Args: those of :func:`moezoo.zoo.upcycle_vit`.
    """

    def __init__(self, moe_blocks: str | list[int] = "every_2", num_experts: int = 8, k: int = 2,
                 capacity_factor: float = 2.0, eval_capacity_factor: float | None = None,
                 batch_priority: bool = True, group_images: int = 8) -> None:
        self.kwargs = dict(moe_blocks=moe_blocks, num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                           eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                           group_images=group_images)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from moezoo.zoo.upcycling import upcycle_vit

        if routed_layers(_model(pl_module)):
            return  # already sparse (e.g. resumed from an upcycled checkpoint)
        pl_module.model = upcycle_vit(_model(pl_module), **self.kwargs)


class ExpertSpecialisedFineTuning(Callback):
    """ESFT (Wang et al. 2024, arXiv 2407.01906): train only the experts the new task uses most.

    Before training, the model routes ``num_batches`` training batches; per routed layer the experts
    are ranked by their share of routed tokens (ESFT's token-selection ratio) and the fewest whose
    shares add up to ``threshold`` are selected. Everything else is frozen: other parameters get
    ``requires_grad=False`` (no optimiser state); unselected experts, which share stacked tensors with
    the selected ones, get zero gradients and are restored after every optimiser step, so weight decay
    cannot move them either.

    Args:
        threshold: cumulative routed-token share to cover per layer.
        num_batches: training batches used to measure the shares.
    """

    def __init__(self, threshold: float = 0.5, num_batches: int = 8) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ESFT: threshold must be in (0, 1], got {threshold}")
        if num_batches < 1:
            raise ValueError(f"ESFT: num_batches must be >= 1, got {num_batches}")
        self.threshold, self.num_batches = threshold, num_batches
        self.selected: dict[str, list[int]] = {}
        self._frozen: list[tuple[Tensor, Tensor, Tensor]] = []  # (parameter, keep mask, saved values)
        self._hooks: list = []

    @torch.no_grad()
    def _shares(self, model: nn.Module, batches: Sequence) -> dict[str, Tensor]:
        was_training = model.training
        model.eval()
        totals: dict[str, Tensor] = {}
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs)
            for name, layer in routed_layers(model):
                counts = layer.last_stats["tokens_per_expert"].float()
                totals[name] = totals.get(name, torch.zeros_like(counts)) + counts
        model.train(was_training)
        return {name: t / t.sum() for name, t in totals.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = _model(pl_module)
        loader = trainer.datamodule.train_dataloader()
        batches = [b for _, b in zip(range(self.num_batches), loader)]
        shares = self._shares(model, batches)
        # A second fit selects afresh: the previous fit's gradient masks and saved values go.
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._frozen, self.selected = [], [], {}
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in routed_layers(model):
            order = torch.argsort(shares[name], descending=True)
            cumulative = torch.cumsum(shares[name][order], 0)
            count = int((cumulative < self.threshold).sum().item()) + 1
            chosen = sorted(order[:count].tolist())
            self.selected[name] = chosen
            for experts in (m for m in layer.modules() if isinstance(m, Experts)):
                keep = torch.zeros(experts.num_experts, dtype=torch.bool)
                keep[chosen] = True
                for p in experts.parameters():
                    p.requires_grad_(True)
                    mask = keep.view(-1, *([1] * (p.dim() - 1))).to(p.device)
                    self._hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
                    self._frozen.append((p, mask, p.detach().clone()))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        for p, keep, saved in self._frozen:
            p.copy_(torch.where(keep, p, saved))


class BranchTrainMix(Callback):
    """Branch-Train-MiX (arXiv 2403.07816): replace the task's dense ViT by the MoE merged from N dense
    parents of its architecture (see :func:`moezoo.zoo.btx.branch_train_mix`), then train on.

    Args:
        parents: N >= 2 weights of the task's architecture, each a checkpoint path (safetensors or
            ``moezoo fit`` ``.ckpt``) or, if no such file exists, a zoo entry name (its published,
            hash-checked weights).
        k, aux_loss_weights: those of :func:`~moezoo.zoo.btx.branch_train_mix`.
    """

    def __init__(self, parents: list[str], k: int = 2, aux_loss_weights: dict[str, float] | None = None) -> None:
        if len(parents) < 2:
            raise ValueError(f"BranchTrainMix: parents must list at least 2 entries or checkpoints, got {parents!r}")
        self.parents, self.k, self.aux_loss_weights = list(parents), k, aux_loss_weights

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import copy

        from moezoo.zoo.btx import branch_train_mix
        from moezoo.zoo.checkpoint import load_checkpoint
        from moezoo.zoo.registry import load_pretrained

        if routed_layers(_model(pl_module)):
            return  # already merged (e.g. resumed from a BTX checkpoint)
        loaded = []
        for parent in self.parents:
            model = copy.deepcopy(_model(pl_module))
            if Path(parent).exists():
                load_checkpoint(model, parent)
            else:  # not a file: a zoo entry (an unknown name is the registry's error)
                load_pretrained(model, parent)
            loaded.append(model)
        pl_module.model = branch_train_mix(loaded, k=self.k, aux_loss_weights=self.aux_loss_weights)
