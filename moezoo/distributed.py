"""Training on several processes: expert parallelism as a Lightning callback, composable with
Lightning's DDP strategy and with FSDP2 (``ModelParallelStrategy``)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.expert_parallel import (
    ExpertParallelGroups,
    expert_shards,
    init_expert_parallel,
    localize_expert_state,
    shard_experts,
)
from moezoo.zoo.checkpoint import CheckpointError

__all__ = ["ExpertParallel"]


class ExpertParallel(Callback):
    """Shard every expert bank over groups of ``size`` ranks (tokens move with all-to-all).

    Use with ``trainer.strategy: ddp`` (or FSDP2 through ``ModelParallelStrategy``) and ``devices x
    num_nodes`` a multiple of ``size``; e.g. 8 GPUs with ``size: 4`` = 2-way data parallel x 4-way
    expert parallel on a (2, 4) device mesh. In ``setup`` (after the process group exists, before the
    strategy wraps the model) it creates the mesh, keeps each rank's expert shard of every bank, and
    tells DDP not to average the sharded parameters; before every optimiser step it sums their
    gradients over the ranks that hold the same shard and divides by the world size, which is what
    DDP does for the replicated parameters. Under FSDP2 the expert shards stay whole on their rank
    (each already holds only E/P experts); FSDP2 shards everything else. Gradient clipping by norm
    uses the whole model's norm (:meth:`clip_grad_norm`, called by :class:`~moezoo.task.MoETask`).

    Checkpoints hold every expert and the optimiser state of every expert (gathered over the
    expert-parallel group when saved), so they load into a single process, and at any
    expert-parallel size; :class:`~moezoo.task.MoETask` cuts them back to the rank's shard when a
    run resumes (:meth:`localize_checkpoint`).

    Args:
        size: expert-parallel group size P (every bank's expert count must be divisible by it).
    """

    def __init__(self, size: int = 2) -> None:
        self.size = require_int("ExpertParallel", "size", size)
        self.groups: ExpertParallelGroups | None = None
        self.sharded: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.groups is not None or self.size == 1:
            return
        if not dist.is_initialized() or trainer.world_size % self.size:
            raise ValueError(
                f"ExpertParallel(size={self.size}): the world size must be a multiple of P={self.size} under a "
                f"distributed strategy, got world size {trainer.world_size}"
                f"{'' if dist.is_initialized() else ' without torch.distributed'}"
            )
        self.groups = init_expert_parallel(self.size)
        self.sharded = shard_experts(pl_module, self.groups)
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(self.sharded))

    def sharded_parameters(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """The rank-specific expert parameters, in the order of :attr:`sharded`."""
        params = dict(pl_module.named_parameters())
        return [params[n] for n in self.sharded if n in params]

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
        sharded = {id(p) for p in self.sharded_parameters(pl_module)}
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

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.groups is None:
            return
        for p in self.sharded_parameters(pl_module):
            if p.grad is None:
                continue
            if self.groups.replicas is not None:
                dist.all_reduce(p.grad, group=self.groups.replicas)
            p.grad.div_(trainer.world_size)

    # -- checkpoints: every expert on disk, this rank's shard in memory ---------------------------
    def _optimizer_entries(self, optimizer: torch.optim.Optimizer, saved: dict,
                           pl_module: nn.Module) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """(parameter name, its entry in ``saved``, an ``optimizer.state_dict()``) of every sharded
        parameter with optimiser state; state indices follow the optimiser's parameter order."""
        names = {id(p): n for n, p in pl_module.named_parameters()}
        sharded = set(self.sharded)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            name = names.get(id(p))
            if name in sharded and index in saved.get("state", {}):
                # optimizer.state_dict() shares these per-parameter dicts with the live state: the
                # caller edits a copy.
                saved["state"][index] = dict(saved["state"][index])
                yield name, saved["state"][index]

    @torch.no_grad()
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.groups is None:
            return
        size, group = self.groups.size, self.groups.group

        def gathered(local: Tensor) -> Tensor:
            shards = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(shards, local.detach().contiguous(), group=group)
            return torch.cat(shards).cpu()

        state = checkpoint["state_dict"]
        for name, p in zip(self.sharded, self.sharded_parameters(pl_module)):
            state[name] = gathered(p)
        local_experts = expert_shards(pl_module)
        for optimizer, saved in zip(trainer.optimizers, checkpoint.get("optimizer_states", [])):
            for name, entry in self._optimizer_entries(optimizer, saved, pl_module):
                count = local_experts[name][1]
                for key, value in entry.items():
                    if isinstance(value, Tensor) and value.dim() and value.shape[0] == count:
                        entry[key] = gathered(value)

    def localize_checkpoint(self, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Cut a checkpoint's experts to this rank's shards, in place (called by
        :meth:`MoETask.on_load_checkpoint <moezoo.task.MoETask.on_load_checkpoint>`, before the
        weights are loaded; the optimiser state is cut when the optimiser loads it).

        Raises:
            CheckpointError: naming the key, when the checkpoint's expert count differs from the model's.
        """
        if self.groups is None:
            return
        try:
            checkpoint["state_dict"] = localize_expert_state(pl_module, checkpoint["state_dict"])
        except ValueError as err:
            raise CheckpointError(f"resuming an expert-parallel run: {err}") from err

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The optimisers exist from here on and load their checkpointed state after this hook.
        if self.groups is None:
            return
        for optimizer in trainer.optimizers:
            optimizer.register_load_state_dict_pre_hook(
                lambda opt, saved: self._localize_optimizer_state(opt, saved, pl_module))

    def _localize_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict, pl_module: nn.Module) -> dict:
        shards = expert_shards(pl_module)
        for name, entry in self._optimizer_entries(optimizer, saved, pl_module):
            start, count, total = shards[name]
            for key, value in list(entry.items()):
                if isinstance(value, Tensor) and value.dim() and value.shape[0] == total:
                    entry[key] = value[start : start + count]
        return saved
