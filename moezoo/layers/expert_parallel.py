"""Expert parallelism: every expert bank's experts sharded over a process group, tokens moved to
their experts and back with ``torch.distributed.all_to_all_single``.

Every rank routes its own tokens (routers are replicated); rank ``r`` of an expert-parallel group of
size P holds experts ``[r * E/P, (r + 1) * E/P)`` of each bank. Per bank call
(:class:`AllToAllDispatcher`): the row counts for every rank are exchanged first, then the rows and
their local expert ids; the owner computes the unweighted expert outputs through the bank's own
backend, and they come back the same way; the combine weights are applied where the tokens live, so
the router's gradient never leaves its rank. With data parallelism on top (world = D x P), the ranks
holding the same shard form a replica group over which expert gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moezoo.kernels.sorting import sort_by_expert
from moezoo.layers.experts import Dispatcher, ExpertBank, combine_rows
from moezoo.routers.routing import Routing

__all__ = ["AllToAllDispatcher", "ExpertParallelGroups", "all_to_all", "expert_banks", "expert_shards",
           "init_expert_parallel", "localize_expert_state", "shard_experts"]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups of expert parallelism on this rank.

    Attributes:
        mesh: the 2-D device mesh ``("expert_replicas", "expert_parallel")`` of shape (D, P) over
            the world: a row holds all experts once (tokens move inside it), a column holds the
            same shard (data parallelism over D).
        size: P, ranks per expert-parallel group.
        rank: this rank's index in its expert-parallel group (which expert shard it owns).
        group: this rank's expert-parallel group.
        replicas: the ranks that hold the same expert shard (expert gradients are summed over it);
            None when there is no data parallelism across expert-parallel groups (D = 1).
    """

    mesh: DeviceMesh
    size: int
    rank: int
    group: dist.ProcessGroup
    replicas: dist.ProcessGroup | None


def init_expert_parallel(size: int) -> ExpertParallelGroups:
    """Create the (D, P) mesh on an initialised default process group of ``world = D x P`` ranks:
    consecutive blocks of ``size`` ranks share the experts. Every rank must call this."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed to be initialised")
    world = dist.get_world_size()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(
            f"expert parallelism: the world size {world} must be a multiple of the expert-parallel size P, "
            f"got P={size!r}"
        )
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // size, size), mesh_dim_names=("expert_replicas", "expert_parallel"))
    return ExpertParallelGroups(
        mesh=mesh, size=size, rank=mesh.get_local_rank("expert_parallel"), group=mesh.get_group("expert_parallel"),
        replicas=mesh.get_group("expert_replicas") if world > size else None,
    )


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


class AllToAllDispatcher(Dispatcher):
    """Sends each assignment to the rank of its expert, runs it there, and combines at home.

    Args:
        groups: from :func:`init_expert_parallel`.
    """

    def __init__(self, groups: ExpertParallelGroups) -> None:
        self.groups = groups

    def __call__(self, x: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
        local, group = bank.num_local_experts, self.groups.group
        order, _, _ = sort_by_expert(routing.expert, routing.num_experts)
        token, expert = routing.token[order], routing.expert[order]
        destination = torch.div(expert, local, rounding_mode="floor")
        send = torch.bincount(destination, minlength=self.groups.size)
        receive = torch.empty_like(send)
        dist.all_to_all_single(receive, send, group=group)  # counts first: the row splits
        send_splits, receive_splits = send.tolist(), receive.tolist()

        rows = x.index_select(0, token)
        if bank.bfloat16_dispatch:  # vmoe sends bf16 rows: half the volume, the same rounding
            rows = rows.to(torch.bfloat16)
        arrived = all_to_all(rows, receive_splits, send_splits, group).to(x.dtype)
        local_expert = torch.empty(sum(receive_splits), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(local_expert, expert - destination * local, receive_splits, send_splits, group=group)
        outputs = bank.compute_rows(arrived, local_expert)
        if bank.bfloat16_dispatch:
            outputs = outputs.to(torch.bfloat16)
        returned = all_to_all(outputs, send_splits, receive_splits, group)
        if bank.bfloat16_dispatch:
            return combine_rows(returned.float(), token, routing.weight[order], x.shape[0]).to(x.dtype)
        return combine_rows(returned, token, routing.weight[order], x.shape[0])


def expert_banks(model: nn.Module) -> list[tuple[str, ExpertBank]]:
    """(qualified name, bank) of every expert bank in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertBank)]


@torch.no_grad()
def shard_experts(model: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """Keep only this rank's shard of every expert bank and switch the banks to all-to-all dispatch.

    Every bank's E must be divisible by P; the check covers all banks before any is changed.

    Returns:
        The qualified names of the sharded (now rank-specific) parameters.

    Raises:
        ValueError: naming the model when it has no expert bank, or the bank, E and P when P does
            not divide E.
    """
    banks = expert_banks(model)
    if not banks:
        raise ValueError(f"expert parallelism: {type(model).__name__} has no expert bank to shard")
    for name, bank in banks:
        if bank.sharded:
            raise ValueError(f"expert parallelism: {name or type(bank).__name__} is already sharded")
        if bank.num_experts % groups.size:
            raise ValueError(
                f"expert parallelism: {name or type(bank).__name__} has E={bank.num_experts} experts, which "
                f"P={groups.size} ranks cannot split evenly (E must be a multiple of P)"
            )
    dispatcher = AllToAllDispatcher(groups)
    sharded = []
    for name, bank in banks:
        local = bank.num_experts // groups.size
        for param in bank.keep_experts(groups.rank * local, local, dispatcher):
            sharded.append(f"{name}.{param}" if name else param)
    return sharded


def expert_shards(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """For every parameter of a sharded bank: qualified name -> (first expert, local experts, E)."""
    shards = {}
    for name, bank in expert_banks(model):
        if bank.sharded:
            for param, _ in bank.named_parameters(recurse=False):
                shards[f"{name}.{param}" if name else param] = (bank.expert_start, bank.num_local_experts,
                                                                  bank.num_experts)
    return shards


def localize_expert_state(model: nn.Module, state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A state dict with all E experts per bank (what checkpoints hold) cut to this rank's shards.

    Args:
        model: the (sharded) model.
        state: full state dict; keys are ``prefix`` + the model's parameter names.
        prefix: e.g. ``"model."`` for a task's checkpoint.

    Returns:
        A new dict; tensors of unsharded parameters are passed through.

    Raises:
        ValueError: naming the key, when a bank's tensor does not hold E experts.
    """
    out = dict(state)
    for name, (start, count, total) in expert_shards(model).items():
        key = prefix + name
        if key not in out:
            continue
        if out[key].dim() == 0 or out[key].shape[0] != total:
            raise ValueError(
                f"{key} holds {out[key].shape[0] if out[key].dim() else 0} experts but the model's bank has "
                f"E={total} (sharded over {total // count} ranks)"
            )
        out[key] = out[key][start : start + count]
    return out
