"""moezoo: a model zoo of specialised and multimodal Mixture-of-Experts models.

Public API::

    import moezoo
    model = moezoo.create_model("vmoe_ti_digits", pretrained=True)
    layer = moezoo.MoE(dim=512, hidden=2048, num_experts=8, router=moezoo.routers.TopKRouter(512, 8, k=2))
"""

from moezoo import kernels, layers, routers
from moezoo.kernels import expert_mlp
from moezoo.layers import (
    MLP,
    MixtureOfAttentionHeads,
    MoE,
    MultimodalMoE,
    SoftMoE,
    SwitchHeadAttention,
    aux_loss,
    parameter_counts,
    routing_stats,
)
from moezoo.routers import (
    BalancedAssignmentRouter,
    BatchPrioritizedRouter,
    ExpertChoiceRouter,
    GroupLimitedRouter,
    HashRouter,
    MoARouter,
    Router,
    Routing,
    SigmaMoERouter,
    SigmoidRouter,
    SinkhornRouter,
    SparseMixerRouter,
    SpeechMoERouter,
    SwitchHeadSelector,
    TopKRouter,
)
from moezoo.zoo import PretrainedCfg, create_model, list_models, load_checkpoint, register_model, save_checkpoint
from moezoo.zoo.hf import from_transformers
from moezoo.zoo.registry import get_pretrained_cfg, is_model, list_pretrained, push_to_hub

# The vision entries become timm models (timm.create_model("vmoe_ti_digits"), timm.list_models, ...).
import moezoo.modalities.vision.zoo  # noqa: E402, F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BalancedAssignmentRouter",
    "BatchPrioritizedRouter",
    "ExpertChoiceRouter",
    "GroupLimitedRouter",
    "HashRouter",
    "MixtureOfAttentionHeads",
    "MoARouter",
    "MoE",
    "MultimodalMoE",
    "PretrainedCfg",
    "Router",
    "Routing",
    "SigmaMoERouter",
    "SigmoidRouter",
    "SinkhornRouter",
    "SoftMoE",
    "SparseMixerRouter",
    "SpeechMoERouter",
    "SwitchHeadAttention",
    "SwitchHeadSelector",
    "TopKRouter",
    "aux_loss",
    "create_model",
    "expert_mlp",
    "from_transformers",
    "get_pretrained_cfg",
    "is_model",
    "kernels",
    "layers",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "parameter_counts",
    "push_to_hub",
    "register_model",
    "routers",
    "routing_stats",
    "save_checkpoint",
]
