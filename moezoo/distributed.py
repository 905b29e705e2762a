"""Training on several processes: expert parallelism as a Lightning callback, composable with
Lightning's DDP strategy (data parallelism over the remaining factor of the world size)."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from moezoo.layers.expert_parallel import ExpertParallelGroups, init_expert_parallel, shard_experts

__all__ = ["ExpertParallel"]


class ExpertParallel(Callback):
    """Shard every MoE layer's experts over groups of ``size`` ranks (tokens move with all-to-all).

    Use with ``trainer.strategy: ddp`` and ``devices x num_nodes`` a multiple of ``size``; e.g. 8
    GPUs with ``size: 4`` = 2-way data parallel x 4-way expert parallel. In ``setup`` (after the
    process group exists, before DDP wraps the model) it creates the groups, keeps each rank's expert
    shard, and tells DDP not to average the sharded parameters; before every optimiser step it sums
    their gradients over the ranks that hold the same shard and divides by the world size, which is
    what DDP does for the replicated parameters. Gradient clipping by norm uses the whole model's
    norm (:meth:`clip_grad_norm`, called by :class:`~moezoo.task.MoETask`). Checkpoints hold the full
    experts (gathered), so
    they load into a single-process model; resuming an expert-parallel run from one is not supported.

    Args:
        size: expert-parallel group size P (experts per layer must be divisible by it).
    """

    def __init__(self, size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"ExpertParallel: size must be >= 1, got {size}")
        self.size = size
        self.groups: ExpertParallelGroups | None = None
        self.sharded: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.groups is not None or self.size == 1:
            return
        if not dist.is_initialized() or trainer.world_size % self.size:
            raise ValueError(
                f"ExpertParallel(size={self.size}) needs a distributed strategy whose world size "
                f"({trainer.world_size}) is a multiple of it"
            )
        self.groups = init_expert_parallel(self.size)
        self.sharded = shard_experts(pl_module, self.groups)
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(self.sharded))

    @torch.no_grad()
    def clip_grad_norm(self, pl_module: L.LightningModule, max_norm: float) -> Tensor:
        """Scale every gradient so the whole model's gradient norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` on a single process; returns the norm before clipping.

        Lightning's own clipping would use each rank's local norm, which counts only that rank's
        expert shard: ranks would scale the replicated weights differently and drift apart. The
        replicated gradients are equal on every rank (DDP averaged them); the shards of one
        expert-parallel group together make up the experts, so their squared norms are summed over
        the group.
        """
        sharded = {id(p) for p in self._sharded_parameters(pl_module)}
        grads = [(p.grad, id(p) in sharded) for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        device = grads[0][0].device
        replicated = torch.zeros((), device=device, dtype=torch.float32)
        shard = torch.zeros((), device=device, dtype=torch.float32)
        for g, is_shard in grads:
            if is_shard:
                shard += g.float().pow(2).sum()
            else:
                replicated += g.float().pow(2).sum()
        dist.all_reduce(shard, group=self.groups.group)
        total = (replicated + shard).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def _sharded_parameters(self, pl_module: L.LightningModule):
        params = dict(pl_module.named_parameters())
        return [params[n] for n in self.sharded if n in params]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.groups is None:
            return
        for p in self._sharded_parameters(pl_module):
            if p.grad is None:
                continue
            if self.groups.replicas is not None:
                dist.all_reduce(p.grad, group=self.groups.replicas)
            p.grad.div_(trainer.world_size)

    @torch.no_grad()
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.groups is None:
            return
        state = checkpoint["state_dict"]
        for name, p in zip(self.sharded, self._sharded_parameters(pl_module)):
            shards = [torch.empty_like(p) for _ in range(self.groups.size)]
            dist.all_gather(shards, p.detach().contiguous(), group=self.groups.group)
            state[name] = torch.cat(shards).cpu()
