"""Expert parallelism: the experts of each MoE layer are sharded over a process group and tokens
travel to their experts and back with ``torch.distributed.all_to_all_single``.

Every rank routes its own tokens (the router is replicated); rank ``r`` of an expert-parallel group
of size P owns experts ``[r * E/P, (r + 1) * E/P)``. Per layer: the counts of rows for every rank
are exchanged first, then the rows, their local expert ids, and, after the expert computation (in
:mod:`moezoo.kernels`, unweighted), the outputs come back the same way; the combine weights are
applied where the tokens live, so the router's gradient never leaves its rank. With data
parallelism on top (world = D x P), the ranks holding the same expert shard form a replica group
over which expert gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moezoo.layers.experts import Experts
from moezoo.routers.routing import Routing

__all__ = ["ExpertParallelGroups", "all_to_all", "expert_parallel_mlp", "init_expert_parallel", "shard_experts"]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups of expert parallelism on this rank.

    Attributes:
        size: P, ranks per expert-parallel group.
        rank: this rank's index in its expert-parallel group (which expert shard it owns).
        group: this rank's expert-parallel group (tokens move inside it).
        replicas: the ranks that hold the same expert shard (expert gradients are summed over it);
            None when there is no data parallelism across expert-parallel groups.
    """

    size: int
    rank: int
    group: dist.ProcessGroup | None
    replicas: dist.ProcessGroup | None


def init_expert_parallel(size: int) -> ExpertParallelGroups:
    """Create the groups on an initialised default process group of ``world`` ranks: consecutive
    blocks of ``size`` ranks share the experts; every rank must call this (same order)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed to be initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"expert_parallel_size must divide the world size {world}, got {size}")
    own_group = replicas = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            own_group = group
    if world > size:
        for offset in range(size):
            group = dist.new_group(list(range(offset, world, size)))
            if rank % size == offset:
                replicas = group
    return ExpertParallelGroups(size=size, rank=rank % size, group=own_group, replicas=replicas)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back along the reverse splits."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable ``all_to_all_single``: x (sum(in_splits), ...) -> (sum(out_splits), ...)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_parallel_mlp(x: Tensor, routing: Routing, experts: Experts, groups: ExpertParallelGroups) -> Tensor:
    """What ``experts(x, routing)`` computes with all E experts, where this rank holds E/P of them.

    Args:
        x: (tokens, dim) this rank's tokens.
        routing: this rank's assignments over all E experts.
        experts: this rank's shard of the experts (E/P of them).
        groups: from :func:`init_expert_parallel`.

    Returns:
        (tokens, dim).
    """
    local = experts.num_experts
    if routing.num_experts != local * groups.size:
        raise ValueError(
            f"routing is over {routing.num_experts} experts but {groups.size} ranks x {local} local experts "
            f"= {local * groups.size}"
        )
    order = torch.argsort(routing.expert, stable=True)
    token, expert = routing.token[order], routing.expert[order]
    weight = routing.weight[order].to(x.dtype)
    destination = torch.div(expert, local, rounding_mode="floor")
    send = torch.bincount(destination, minlength=groups.size)
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=groups.group)  # counts first: the row splits
    send_splits, receive_splits = send.tolist(), receive.tolist()

    rows = all_to_all(x.index_select(0, token), receive_splits, send_splits, groups.group)
    local_expert = torch.empty(sum(receive_splits), dtype=expert.dtype, device=expert.device)
    dist.all_to_all_single(local_expert, expert - destination * local, receive_splits, send_splits,
                           group=groups.group)
    arrived = rows.shape[0]
    unweighted = experts(rows, Routing(
        token=torch.arange(arrived, device=x.device), expert=local_expert,
        weight=torch.ones(arrived, device=x.device, dtype=torch.float32),
        num_tokens=arrived, num_experts=local,
    ))
    returned = all_to_all(unweighted, send_splits, receive_splits, groups.group)
    out = x.new_zeros(x.shape[0], returned.shape[-1])
    return out.index_add(0, token, returned * weight.unsqueeze(1))


@torch.no_grad()
def shard_experts(model: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """Keep only this rank's shard of every MoE layer's experts and switch the layers to expert
    parallelism. Returns the qualified names of the sharded (now rank-specific) parameters."""
    from moezoo.layers.moe import MoE

    names = []
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, MoE) or layer.expert_parallel is not None:
            continue
        experts = layer.experts
        if experts.num_experts % groups.size:
            raise ValueError(
                f"{layer_name}: {experts.num_experts} experts cannot be split over {groups.size} ranks"
            )
        local = experts.num_experts // groups.size
        start = groups.rank * local
        for param_name, param in list(experts.named_parameters()):
            shard = nn.Parameter(param.detach()[start : start + local].clone(), requires_grad=param.requires_grad)
            setattr(experts, param_name, shard)
            names.append(f"{layer_name}.experts.{param_name}" if layer_name else f"experts.{param_name}")
        experts.num_experts = local
        layer.expert_parallel = groups
    return names
