"""Rank-global routing statistics: σ-MoE's entropy regulariser over every process's tokens (the
reference's ``perplexity_reg_mode="global"``) and LIMoE's local/global entropy losses (defined over
the batch's tokens of a modality) on 2 gloo processes equal one process on the union of their
tokens, in value and (after data-parallel gradient averaging) in every gradient."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_expert_parallel import _init, free_port

WORLD, TOKENS, DIM = 2, 11, 8


def _worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        from moezoo.layers import aux_loss
        from moezoo.modalities.text import sigma_moe
        from moezoo.routers.losses import marginal_entropy_loss

        torch.manual_seed(0)
        layer = sigma_moe(DIM, 6, 5, 2, entropy_weight=0.5).train()
        inputs = torch.randn(world, TOKENS, DIM)
        single = copy.deepcopy(layer)

        # One process on the union: the token-mean objective and the regulariser of all tokens.
        # (No process group is consulted: the union's loss is computed here, on every rank, locally.)
        union = inputs.reshape(-1, DIM)
        out = single(union)
        logits = single.router.compute_logits(union)
        expected_reg = -torch.special.entr(torch.softmax(logits, -1).mean(0)).sum()
        # The global loss by our own formula on the union, as a reference independent of collectives.
        torch.testing.assert_close(marginal_entropy_loss(logits), expected_reg)
        (out.pow(2).mean() + 0.5 * expected_reg).backward()

        # Two processes, each with its half: DDP averages the gradients of the per-process objectives.
        x = inputs[rank]
        local_out = layer(x)
        reg = layer.last_losses["entropy_reg"]
        torch.testing.assert_close(reg, expected_reg, atol=1e-6, rtol=1e-5)  # the global value on every rank
        (local_out.pow(2).mean() + aux_loss(layer)).backward()
        for name, p in layer.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            grad /= world
            torch.testing.assert_close(grad, dict(single.named_parameters())[name].grad, atol=1e-6, rtol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        # Per process in evaluation (the loss is unused there, and no process may be waited for).
        layer.eval()
        layer(x)
        torch.testing.assert_close(layer.last_losses["entropy_reg"],
                                   marginal_entropy_loss(layer.router.compute_logits(x)))
    finally:
        dist.destroy_process_group()


def test_sigma_moe_entropy_over_two_processes_equals_one_process_on_the_union():
    mp.spawn(_worker, args=(WORLD, free_port()), nprocs=WORLD, join=True)


def _limoe_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        from moezoo.layers.multimodal_moe import MultimodalMoE
        from moezoo.routers.batch_prioritized import BatchPrioritizedRouter

        torch.manual_seed(0)
        weights = {f"{m}/{n}": 1.0 for m in ("image", "text") for n in ("local_entropy", "global_entropy")}
        # No routing noise and room for every token: the routing is deterministic, so both setups agree.
        layer = MultimodalMoE(DIM, 12, 4, BatchPrioritizedRouter(DIM, 4, k=1, noise_std=0.0, capacity_factor=8.0),
                              entropy_thresholds={"text": 1.2}, aux_loss_weights=weights).train()
        single = copy.deepcopy(layer)
        # Unequal text token counts per process (as padding leaves them): rank 0 has 5, rank 1 has 3.
        images = torch.randn(world, TOKENS, DIM)
        texts = [torch.randn(5, DIM), torch.randn(3, DIM)]

        # The union on one process, with the losses written out from the paper's definitions.
        union = {"image": images.reshape(-1, DIM), "text": torch.cat(texts)}
        expected = {}
        for m, x in union.items():
            p = torch.softmax(single.router.compute_logits(x), -1)
            expected[f"{m}/local_entropy"] = torch.special.entr(p).sum(-1).mean()
            marginal = torch.special.entr(p.mean(0)).sum()
            expected[f"{m}/global_entropy"] = (-marginal if m == "image" else torch.clamp(1.2 - marginal, min=0.0))
        single(union)
        for name, value in expected.items():
            torch.testing.assert_close(single.last_losses[name], value, atol=1e-6, rtol=1e-5)
        sum(expected.values()).backward()

        layer({"image": images[rank], "text": texts[rank]})
        for name, value in expected.items():  # the union's value on every process
            torch.testing.assert_close(layer.last_losses[name], value.detach(), atol=1e-6, rtol=1e-5,
                                       msg=lambda msg, name=name: f"{name}: {msg}")
        sum(layer.last_losses[n] for n in expected).backward()
        for name, p in layer.router.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            grad /= world
            torch.testing.assert_close(grad, dict(single.router.named_parameters())[name].grad, atol=1e-6,
                                       rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_limoe_entropy_losses_over_two_processes_equal_one_process_on_the_union():
    mp.spawn(_limoe_worker, args=(WORLD, free_port()), nprocs=WORLD, join=True)
