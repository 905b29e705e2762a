"""What every moezoo LightningModule shares: the optimiser and schedule, aux losses, routing logs."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from moezoo.layers.routed import aux_loss, update_routers

__all__ = ["MoETask"]


class MoETask(L.LightningModule):
    """Base task: AdamW with decoupled weight decay (not on biases, norms, embeddings), linear warmup
    then cosine decay per step, the model's weighted auxiliary routing losses added to the objective,
    and a :class:`~moezoo.monitoring.RoutingMonitor` logging routing statistics and load heatmaps
    every ``log_routing_every_n_steps`` training steps.

    Args:
        model: the network (a plain ``nn.Module`` from a modality's ``model.py``).
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay on matrices (ndim >= 2).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``; 1.0 keeps lr constant.
        aux_loss_weights: coefficient per routing-loss name for every layer; None uses each
            layer's own coefficients (e.g. V-MoE's 0.005 importance + 0.005 load).
        log_routing_every_n_steps: how often routing statistics and heatmaps are logged in training.
        nonfinite: what a NaN/inf in training does: ``"raise"`` (routers raise a ``ValueError`` naming
            it) or ``"skip"`` (routers stop checking; a step whose loss is not finite is skipped with a
            warning, and the count is logged as ``train/skipped_steps``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        aux_loss_weights: dict[str, float] | None = None,
        log_routing_every_n_steps: int = 50,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if log_routing_every_n_steps < 1:
            raise ValueError(f"log_routing_every_n_steps must be >= 1, got {log_routing_every_n_steps}")
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.aux_loss_weights = None if aux_loss_weights is None else dict(aux_loss_weights)
        self.log_routing_every_n_steps = log_routing_every_n_steps
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        if nonfinite == "skip":
            for module in model.modules():
                if hasattr(module, "check_finite"):
                    module.check_finite = False
        self.save_hyperparameters(ignore=["model"])

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def configure_model(self) -> None:
        """Fully sharded data parallelism (FSDP2) under Lightning's ``ModelParallelStrategy``: each
        transformer block (``model.blocks`` or ``model.layers``) is one sharding unit, then the rest.
        Lightning's ``FSDPStrategy`` (FSDP1) needs a GPU; this path also runs on CPU with gloo.
        Expert shards of :class:`~moezoo.distributed.ExpertParallel` stay whole on their rank."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        # fully_shard cannot shard 0-dim parameters (LIMoE's logit scale, Soft MoE's scale): they stay
        # replicated, and their gradients are averaged in on_before_optimizer_step.
        self._replicated = [p for p in self.model.parameters() if p.dim() == 0]
        sharding = self._expert_parallel()
        ignored = set(self._replicated) | set(sharding.sharded_parameters(self) if sharding else [])
        for attribute in ("blocks", "layers"):
            for block in getattr(self.model, attribute, None) or []:
                fully_shard(block, mesh=data_parallel, ignored_params=ignored)
        fully_shard(self.model, mesh=data_parallel, ignored_params=ignored)

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in getattr(self, "_replicated", []):
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(torch.distributed.get_world_size())
        # Once per optimiser step, also under gradient accumulation: e.g. loss-free balancing biases.
        update_routers(self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        sharding = self._expert_parallel()
        if sharding is not None:
            sharding.localize_checkpoint(self, checkpoint)

    def _expert_parallel(self):
        """The trainer's active :class:`~moezoo.distributed.ExpertParallel` callback, or None."""
        from moezoo.distributed import ExpertParallel

        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return next((c for c in callbacks if isinstance(c, ExpertParallel) and c.groups), None)

    # -- objective -----------------------------------------------------------------------------
    def step(self, batch, stage: str) -> tuple[Tensor, int]:
        """The task's loss on ``batch`` and the batch size its metrics are logged with; logs the
        ``stage``'s ("train", "val", "test") metrics. The steps below call it; a task whose
        evaluation is another computation overrides ``validation_step``/``test_step`` instead."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        loss, batch_size = self.step(batch, "train")
        return self.add_aux_loss(loss, "train", batch_size)

    def validation_step(self, batch, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.step(batch, "test")

    def add_aux_loss(self, main_loss: Tensor, stage: str, batch_size: int | None = None) -> Tensor | None:
        """``main_loss`` plus the weighted routing losses of the last forward; logs the latter.

        Returns None (Lightning then skips the optimiser step) when the total is not finite and the
        task was built with ``nonfinite="skip"``.
        """
        aux = aux_loss(self.model, self.aux_loss_weights)
        self.log(f"{stage}/aux_loss", aux.detach(), batch_size=batch_size, sync_dist=stage != "train")
        total = main_loss + aux
        if self.nonfinite == "skip" and stage == "train" and not bool(torch.isfinite(total.detach())):
            self.skipped_steps += 1
            rank_zero_warn(f"moezoo: non-finite loss at step {self.global_step}: step skipped "
                           f"({self.skipped_steps} so far)")
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch_size)
            return None
        return total

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        sharding = self._expert_parallel()
        if sharding is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # Expert-parallel ranks hold different experts: clip by the whole model's norm.
            sharding.clip_grad_norm(self, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self):
        """A :class:`~moezoo.monitoring.RoutingMonitor` and a :class:`~moezoo.resume.RNGStateCheckpoint`
        (exact resumption), unless the trainer already has them."""
        from moezoo.monitoring import RoutingMonitor
        from moezoo.resume import RNGStateCheckpoint

        present = {type(c) for c in (self._trainer.callbacks if self._trainer is not None else [])}
        wanted = [RoutingMonitor(every_n_steps=self.log_routing_every_n_steps), RNGStateCheckpoint()]
        return [c for c in wanted if not any(issubclass(p, type(c)) for p in present)]

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor(self._total_steps()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimiser steps of the run, for the schedule. With ``max_steps`` set, that; otherwise
        Lightning's estimate. The estimate builds the fit loop's training loader before a checkpoint
        is restored, and Lightning then skips restoring the loader's position, so it is avoided when
        it is not needed (exact mid-epoch resumption, see :mod:`moezoo.resume`)."""
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return max(int(trainer.estimated_stepping_batches), 1)

    def _lr_factor(self, total_steps: int):
        warmup, floor = self.warmup_steps, self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor
