"""Auxiliary-loss-free balancing is updated once per optimiser step from the loads of every rank
and every micro-batch: on 2 gloo processes (under DDP, which broadcasts buffers from rank 0) both
ranks hold the bias a single process gets from the union batch, and gradient accumulation counts
every micro-batch once."""

from __future__ import annotations

import copy
import os

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from moezoo.layers import MoE, update_routers
from moezoo.routers import SigmoidRouter
from moezoo.task import MoETask
from tests.distributed.test_expert_parallel import free_port

DIM, EXPERTS = 6, 4


def _layer() -> MoE:
    torch.manual_seed(0)
    return MoE(DIM, 8, EXPERTS, SigmoidRouter(DIM, EXPERTS, k=1, bias_update_rate=0.1))


def _batch(rank: int, step: int) -> torch.Tensor:
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(100 * step + rank))
    x[:, :2] += 2.0 * (rank + 1)  # different ranks load different experts
    return x


def _expected_biases(world: int, steps: int) -> list[torch.Tensor]:
    """One process: each step a forward on the union of the ranks' batches, then one update."""
    single, biases = _layer().train(), []
    for step in range(steps):
        single(torch.cat([_batch(r, step) for r in range(world)]))
        update_routers(single)
        biases.append(single.router.bias.clone())
    return biases


def _ddp_worker(rank: int, world: int, port: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _layer().train()
        model = DistributedDataParallel(layer)  # broadcast_buffers=True: rank 0's bias each forward
        for step, expected in enumerate(_expected_biases(world, steps)):
            model(_batch(rank, step)).sum().backward()
            update_routers(layer)
            torch.testing.assert_close(layer.router.bias, expected, atol=0, rtol=0)
            gathered = [torch.empty(EXPERTS) for _ in range(world)]
            dist.all_gather(gathered, layer.router.bias)
            assert all(torch.equal(g, gathered[0]) for g in gathered)
        assert layer.router.bias.abs().sum() > 0  # it did balance something
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_bias_of_one_process_on_the_union_batch():
    mp.spawn(_ddp_worker, args=(2, free_port(), 4), nprocs=2, join=True)


class _Regression(MoETask):
    def training_step(self, batch, batch_index):
        x, y = batch
        return self.add_aux_loss((self(x) - y).pow(2).mean(), "train")


def test_gradient_accumulation_updates_once_from_every_micro_batch(tmp_path):
    layer = _layer()
    layer.router.gate.weight.requires_grad_(False)  # routing then depends on the bias alone: replayable
    task = _Regression(layer, lr=1e-3, log_routing_every_n_steps=1000)
    reference = copy.deepcopy(task.model).train()
    micro_batches = [_batch(0, 0), _batch(1, 0), _batch(0, 1), _batch(1, 1)]
    data = TensorDataset(torch.cat(micro_batches), torch.zeros(64, DIM))
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(data, batch_size=16))
    # By hand: step 1 counts micro-batches 1 and 2, step 2 counts 3 and 4, one update each.
    for first, second in (micro_batches[:2], micro_batches[2:]):
        reference(torch.cat([first, second]))
        update_routers(reference)
    assert not torch.equal(reference.router.bias, torch.zeros(EXPERTS))
    torch.testing.assert_close(task.model.router.bias, reference.router.bias, atol=0, rtol=0)
    assert task.model.router.pending_load is None
