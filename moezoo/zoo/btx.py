"""Branch-Train-MiX (Sukhbaatar et al. 2024, arXiv 2403.07816): N dense models of one architecture,
each trained on its own domain, merged into one MoE whose experts are their FFNs."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moezoo.layers.moe import MoE, RouterFactory
from moezoo.routers.top_k import TopKRouter

__all__ = ["BTX_LOSS_WEIGHTS", "branch_train_mix", "check_same_architecture"]

#: The paper's load-balancing coefficient (section 2.3: 0.01, Switch's loss).
BTX_LOSS_WEIGHTS = {"load_balancing": 0.01}


def check_same_architecture(parents: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` naming the first key or shape on which a parent differs from parent 0."""
    reference = parents[0].state_dict()
    for i, parent in enumerate(parents[1:], start=1):
        state = parent.state_dict()
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        if missing or extra:
            key = (missing or extra)[0]
            raise ValueError(
                f"branch_train_mix: parents must share one architecture; key {key!r} is in parent "
                f"{0 if missing else i} but not in parent {i if missing else 0}"
            )
        for key, value in reference.items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"branch_train_mix: parents must share one architecture; key {key!r} has shape "
                    f"{tuple(value.shape)} in parent 0 but {tuple(state[key].shape)} in parent {i}"
                )


def branch_train_mix(
    parents: Sequence[nn.Module],
    *,
    k: int = 2,
    router: RouterFactory | None = None,
    aux_loss_weights: Mapping[str, float] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Merge dense timm ``VisionTransformer`` parents into one V-MoE (the parents stay untouched).

    Every block's MLP becomes an MoE layer whose expert i is parent i's MLP, exactly; every other
    parameter and floating-point buffer is the parents' mean (integer buffers come from parent 0).
    The router is new (freshly initialised): by default the paper's ``softmax(top-k(W x))`` with k=2
    and Switch's load-balancing loss at 0.01.

    Args:
        parents: N >= 2 dense ViTs of one architecture (``blocks[j].mlp`` with ``fc1``, GELU, ``fc2``).
        k: experts per token of the default router.
        router: a router factory ``(dim, N) -> router`` replacing the default.
        aux_loss_weights: router loss coefficients (default :data:`BTX_LOSS_WEIGHTS`).
        backend: expert-computation backend.

    Raises:
        ValueError: fewer than 2 parents, parents of different architectures (naming the key and
            the shapes), a parent without ``blocks`` or with MLPs that are not Linear-GELU-Linear.
    """
    if len(parents) < 2:
        raise ValueError(f"branch_train_mix: parents must hold at least 2 models, got {len(parents)}")
    if any(getattr(p, "blocks", None) is None for p in parents):
        raise ValueError("branch_train_mix: every parent must be a timm VisionTransformer (with .blocks)")
    check_same_architecture(parents)
    merged = copy.deepcopy(parents[0])
    num_experts = len(parents)
    if not 1 <= k <= num_experts:
        raise ValueError(f"branch_train_mix: k must be in [1, number of parents = {num_experts}], got {k}")
    if router is None:
        def router(dim: int, experts: int) -> TopKRouter:
            return TopKRouter(dim, experts, k=k, order="topk_softmax")
    # Average everything, then overwrite the MLPs with MoE layers (their parameters are not averaged).
    with torch.no_grad():
        states = [p.state_dict() for p in parents]
        for key, value in merged.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.stack([s[key] for s in states]).mean(0))
    for j, block in enumerate(merged.blocks):
        mlps = [p.blocks[j].mlp for p in parents]
        fc1, fc2 = getattr(mlps[0], "fc1", None), getattr(mlps[0], "fc2", None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear) or not isinstance(
                getattr(mlps[0], "act", None), nn.GELU):
            raise ValueError(f"branch_train_mix: block {j}'s MLP is not Linear-GELU-Linear ({type(mlps[0]).__name__})")
        moe = MoE(
            fc1.in_features, fc1.out_features, num_experts, router,
            activation="gelu_tanh" if mlps[0].act.approximate == "tanh" else "gelu",
            bias=fc1.bias is not None, dropout=getattr(mlps[0].drop1, "p", 0.0), backend=backend,
            aux_loss_weights=BTX_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights,
        ).to(fc1.weight.device, fc1.weight.dtype)
        with torch.no_grad():
            for i, mlp in enumerate(mlps):
                moe.experts.w_in[i].copy_(mlp.fc1.weight.t())
                moe.experts.w_out[i].copy_(mlp.fc2.weight.t())
                if moe.experts.b_in is not None:
                    moe.experts.b_in[i].copy_(mlp.fc1.bias)
                    moe.experts.b_out[i].copy_(mlp.fc2.bias)
        block.mlp = moe
    merged.moe_indices = list(range(len(merged.blocks)))
    return merged
