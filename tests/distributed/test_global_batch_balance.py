"""Qwen's global-batch balancing loss (``TopKRouter(global_balance=True)``) on 2 gloo processes equals
one process on the union of their tokens: the mean of the processes' losses is the union's loss and
the data-parallel average of their gradients is the union's gradient; with two micro-batches per
process the second one's frequencies are those of all four micro-batches."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_expert_parallel import _init, free_port

WORLD, TOKENS, DIM, EXPERTS, K = 2, 9, 8, 5, 2


def _union_loss(router, x):
    """E sum_e f_e P_e on x by the formula, with no collective (the single-process reference)."""
    probs = torch.softmax(router.compute_logits(x), -1)
    counts = torch.bincount(probs.topk(K, dim=-1).indices.reshape(-1), minlength=EXPERTS).float()
    return EXPERTS * (counts / counts.sum() * probs.mean(0)).sum()


def _worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        from moezoo.routers import TopKRouter

        torch.manual_seed(0)
        router = TopKRouter(DIM, EXPERTS, k=K, global_balance=True).train()
        single = copy.deepcopy(router)
        inputs = torch.randn(world, TOKENS, DIM)

        union = _union_loss(single, inputs.reshape(-1, DIM))
        union.backward()

        loss = router(inputs[rank]).losses["global_load_balancing"]
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world, union.detach(), atol=1e-6, rtol=1e-5)
        loss.backward()
        grad = router.gate.weight.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / world, single.gate.weight.grad, atol=1e-6, rtol=1e-5)

        # Gradient accumulation: micro-batch 2 counts micro-batch 1 of every process too.
        router.update_after_step()
        micro = torch.randn(2, world, TOKENS, DIM)
        router(micro[0, rank])
        second = router(micro[1, rank]).losses["global_load_balancing"]
        with torch.no_grad():
            everything = torch.softmax(router.compute_logits(micro.reshape(-1, DIM)), -1)
            counts = torch.bincount(everything.topk(K, dim=-1).indices.reshape(-1), minlength=EXPERTS).float()
            local = torch.softmax(router.compute_logits(micro[1, rank]), -1).mean(0)
        torch.testing.assert_close(second.detach(), EXPERTS * (counts / counts.sum() * local).sum())
    finally:
        dist.destroy_process_group()


def test_global_batch_balance_over_two_processes_equals_one_process_on_the_union():
    mp.spawn(_worker, args=(WORLD, free_port()), nprocs=WORLD, join=True)
