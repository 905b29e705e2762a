"""Layers built from routers and kernels: the MoE FFN, Soft MoE, their dense counterpart, and helpers."""

from moezoo.layers.experts import Experts
from moezoo.layers.mlp import MLP
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.routed import RoutedLayer, aux_loss, parameter_counts, routed_layers, routing_stats
from moezoo.layers.soft_moe import SoftMoE

__all__ = [
    "MLP",
    "Experts",
    "MoE",
    "RoutedLayer",
    "RouterFactory",
    "SoftMoE",
    "aux_loss",
    "parameter_counts",
    "routed_layers",
    "routing_stats",
]
