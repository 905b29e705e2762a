"""What every routed layer records, and the model-level helpers that collect it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moezoo.layers.experts import ExpertBank
from moezoo.routers import losses as L
from moezoo.routers.base import Router

__all__ = [
    "POOLED_LOAD_BALANCING",
    "KeepsLastForward",
    "RoutedLayer",
    "aux_loss",
    "parameter_counts",
    "register_router_updates",
    "routed_layers",
    "routing_stats",
    "update_routers",
]


#: The name of the balancing loss pooled over layers (transformers' ``load_balancing_loss_func``,
#: :func:`moezoo.routers.losses.pooled_load_balancing_loss`): a coefficient under this name makes
#: :func:`aux_loss` add it over the routers' logits of every layer that has that coefficient.
POOLED_LOAD_BALANCING = "pooled_load_balancing"


def _detached(value):
    if isinstance(value, Tensor) and value.grad_fn is not None:
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class KeepsLastForward(nn.Module):
    """A module that keeps tensors of its last forward as attributes (losses, router logits).

    Those tensors carry the forward's autograd graph until the next forward replaces them, so
    that a loss can be formed from them after the forward returns. A copy of the module
    (``copy.deepcopy``, ``timm.utils.ModelEmaV3``, pickling) gets them detached: a graph cannot be
    copied, and a copy has not run that forward; their values stay readable.
    """

    def __getstate__(self) -> dict:
        return {name: _detached(value) for name, value in super().__getstate__().items()}


class RoutedLayer(KeepsLastForward):
    """Base of layers that route (MoE, MoE attention): keeps the last forward's losses, stats and
    router logits.

    The losses keep their autograd graph (:func:`aux_loss` adds them to the objective); a copy of
    the layer holds them detached (see :class:`KeepsLastForward`).

    Args:
        aux_loss_weights: coefficient per auxiliary-loss name, used by :func:`aux_loss` when the
            caller gives none. A loss without a coefficient is not added.
    """

    def __init__(self, aux_loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.aux_loss_weights: dict[str, float] = dict(aux_loss_weights or {})
        for name, value in self.aux_loss_weights.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"aux_loss_weights[{name!r}] must be a number >= 0, got {value!r}")
        self.last_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}
        self.last_logits: Tensor | None = None

    def __prepare_scriptable__(self) -> RoutedLayer:
        # torch.jit.script calls this on every submodule before compiling: fail with the reason and
        # the alternatives instead of TorchScript's error about whichever construct it meets first.
        raise RuntimeError(
            f"{type(self).__name__}: routed layers cannot be compiled by TorchScript (routing returns a "
            "dataclass of data-dependent size and records dicts of tensors). Use torch.compile; for torch.fx "
            "(timm's feature extraction) the layer is a leaf module "
            "(timm.layers.register_notrace_module)."
        )

    def record(self, losses: Mapping[str, Tensor], stats: Mapping[str, Tensor], logits: Tensor | None = None) -> None:
        """Keep a forward's unweighted losses, its stats (detached) and its (tokens, E) router
        logits (differentiable, for losses pooled over layers)."""
        self.last_losses = dict(losses)
        self.last_stats = {k: v.detach() for k, v in stats.items()}
        self.last_logits = logits

    def expert_parameters(self) -> list[tuple[nn.Parameter, float]]:
        """(parameter, share of it active per token) for the layer's routed expert weights.

        Default: the expert banks inside the layer, active at ``k / E`` with k the router's experts
        per token (``capacity_factor`` for expert choice, 1 for routers without k); a layer that runs
        every expert (Soft MoE) reports them all active.
        """
        router = getattr(self, "router", None)
        per_token = getattr(router, "k", None) or getattr(router, "capacity_factor", None) or 1
        out = []
        for module in self.modules():
            if isinstance(module, ExpertBank):
                share = 1.0 if router is None else min(per_token, module.num_experts) / module.num_experts
                out += [(p, share) for p in module.parameters()]
        return out


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    """(qualified name, layer) of every routed layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def aux_loss(model: nn.Module, weights: Mapping[str, float] | None = None) -> Tensor:
    """Sum over routed layers of ``weight[name] * loss[name]`` from each layer's last forward, plus
    ``weight * pooled_load_balancing_loss`` over the layers with a :data:`POOLED_LOAD_BALANCING`
    coefficient (pooled per coefficient, expert count and k).

    Args:
        model: any module containing routed layers.
        weights: coefficient per loss name for every layer; ``None`` uses each layer's own
            ``aux_loss_weights``. Names without a coefficient contribute nothing.

    Returns:
        0-dim tensor (0.0 if there is nothing to add).
    """
    total: Tensor | None = None
    pooled: dict[tuple[float, int, int], list[Tensor]] = {}
    for _, layer in routed_layers(model):
        coefficients = layer.aux_loss_weights if weights is None else weights
        for name, value in layer.last_losses.items():
            c = coefficients.get(name, 0.0)
            if c:
                term = c * value
                total = term if total is None else total + term
        c, k = coefficients.get(POOLED_LOAD_BALANCING, 0.0), getattr(getattr(layer, "router", None), "k", None)
        if c and k is not None and layer.last_logits is not None:
            pooled.setdefault((c, layer.last_logits.shape[-1], k), []).append(layer.last_logits)
    for (c, _, k), logits in pooled.items():
        term = c * L.pooled_load_balancing_loss(logits, k)
        total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def routing_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per routed layer (by qualified name): its last forward's detached stats and loss values."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, layer in routed_layers(model):
        entry = dict(layer.last_stats)
        entry.update({f"loss/{k}": v.detach() for k, v in layer.last_losses.items()})
        out[name or type(layer).__name__] = entry
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters active per token (see :meth:`RoutedLayer.expert_parameters`)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(p.numel() * (1.0 - share) for _, layer in routed_layers(model)
                   for p, share in layer.expert_parameters())
    return {"total": total, "active": int(round(total - inactive))}


def update_routers(model: nn.Module) -> None:
    """Run every router's once-per-optimiser-step update (:meth:`Router.update_after_step
    <moezoo.routers.base.Router.update_after_step>`, e.g. loss-free balancing biases), in module order.

    :class:`~moezoo.task.MoETask` calls it before each optimiser step; with several processes every
    rank must call it at the same point, since updates may all-reduce.
    """
    for module in model.modules():
        if isinstance(module, Router):
            module.update_after_step()


def register_router_updates(optimizer: torch.optim.Optimizer, model: nn.Module):
    """For plain PyTorch loops: run :func:`update_routers` before every ``optimizer.step()``.

    Returns:
        The hook handle (``.remove()`` undoes it).
    """
    return optimizer.register_step_pre_hook(lambda *_: update_routers(model))
