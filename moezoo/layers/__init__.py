"""Layers built from routers and kernels: the MoE FFN, its dense counterpart, and helpers."""

from moezoo.layers.mlp import MLP
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.routed import RoutedLayer, aux_loss, routed_layers, routing_stats

__all__ = ["MLP", "MoE", "RoutedLayer", "RouterFactory", "aux_loss", "routed_layers", "routing_stats"]
