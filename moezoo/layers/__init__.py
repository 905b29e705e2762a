"""Layers built from routers and kernels: the MoE FFN, Soft MoE, their dense counterpart, and helpers."""

from moezoo.layers.attention import RotaryEmbedding, attention_mask
from moezoo.layers.experts import ExpertBank, Experts, LinearExperts
from moezoo.layers.fine_grained import FineGrainedConfig, fine_grained_config, fine_grained_moe
from moezoo.layers.mlp import MLP
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.layers.moe import MoE, RouterFactory
from moezoo.layers.multimodal_moe import MultimodalMoE
from moezoo.layers.peer import PEER
from moezoo.layers.placement import moe_block_indices
from moezoo.layers.routed import (
    RoutedLayer,
    aux_loss,
    parameter_counts,
    register_router_updates,
    routed_layers,
    routing_stats,
    update_routers,
)
from moezoo.layers.soft_moe import SoftMoE
from moezoo.layers.switchhead import SwitchHeadAttention

__all__ = [
    "MLP",
    "ExpertBank",
    "Experts",
    "FineGrainedConfig",
    "LinearExperts",
    "MixtureOfAttentionHeads",
    "MoE",
    "MultimodalMoE",
    "PEER",
    "RotaryEmbedding",
    "RoutedLayer",
    "RouterFactory",
    "SoftMoE",
    "SwitchHeadAttention",
    "attention_mask",
    "aux_loss",
    "fine_grained_config",
    "fine_grained_moe",
    "moe_block_indices",
    "parameter_counts",
    "register_router_updates",
    "routed_layers",
    "routing_stats",
    "update_routers",
]
