"""What each supported transformers MoE architecture's sparse block is, in moezoo's terms.

Per architecture: the block class, the names of its router, shared expert and shared-expert gate,
and how its config maps onto a :class:`~moezoo.zoo.hf.layer.TransformersMoE` (router, expert width,
shared experts, input jitter, auxiliary-loss coefficient). The semantics are those of transformers
5.x's modelling files, read line by line (``models/<type>/modeling_<type>.py``):

=============  ===========================================================================================
mixtral        softmax over all experts, top-k, always renormalised (``TopKRouter(normalize=True)``);
               ``router_jitter_noise`` scales the block input in training
qwen2_moe      softmax top-k, renormalised iff ``norm_topk_prob``; one shared SwiGLU expert of
               ``shared_expert_intermediate_size``, gated by ``sigmoid(shared_expert_gate(x))``
qwen3_moe      softmax top-k, renormalised iff ``norm_topk_prob``
olmoe          softmax top-k, renormalised iff ``norm_topk_prob`` (False in OLMoE's checkpoints)
deepseek_v3    sigmoid scores; selection by ``score + e_score_correction_bias`` within the ``topk_group``
               best of ``n_group`` groups, a group scored by the sum of its top-2 biased scores; weights
               the unbiased scores, divided by their sum + 1e-20 iff ``norm_topk_prob``, times
               ``routed_scaling_factor`` (``GroupLimitedRouter``); ``n_shared_experts`` ungated shared
               experts; layers below ``first_k_dense_replace`` stay dense; no auxiliary loss
deepseek_v2    softmax scores; ``topk_method="greedy"``: top-k (``TopKRouter``), or
               ``"group_limited_greedy"``: within the best ``topk_group`` groups by their best score
               (``GroupLimitedRouter(scores="softmax", group_top=1)``); never renormalised (the router
               ignores ``norm_topk_prob``), times ``routed_scaling_factor``; shared experts as V3
phimoe         SparseMixer top-2 (``SparseMixerRouter``, ε = ``router_jitter_noise``, also at evaluation);
               ``input_jitter_noise`` scales the input twice in training (block and router)
=============  ===========================================================================================

The auxiliary loss of Mixtral, Qwen2/3-MoE, OLMoE and PhiMoE is transformers'
``load_balancing_loss_func`` pooled over the layers, with ``router_aux_loss_coef``
(:data:`~moezoo.layers.routed.POOLED_LOAD_BALANCING`); none of these configs has a z-loss.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from moezoo.layers.routed import POOLED_LOAD_BALANCING
from moezoo.routers.group_limited import GroupLimitedRouter
from moezoo.routers.sparse_mixer import SparseMixerRouter
from moezoo.routers.top_k import TopKRouter

__all__ = ["ARCHITECTURES", "Architecture", "supported"]

#: transformers' ``hidden_act`` names -> moezoo's expert activations (the same functions).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class Architecture:
    """One transformers MoE architecture.

    Attributes:
        model_type: ``config.model_type``.
        block: the class name of its sparse MoE block in ``modeling_<model_type>``.
        router: the block's attribute holding the router (its ``weight`` is the gate).
        build: ``build(config, bias_update_rate) -> (router, layer keyword arguments)``.
        shared: the block's attribute holding the shared expert MLP, if any.
        shared_gate: the block's attribute holding the shared expert's gate, if any.
        router_bias: the router's buffer of selection biases, if any (moezoo's ``router.bias``).
    """

    model_type: str
    block: str
    router: str
    build: Callable[[Any, float], tuple[nn.Module, dict]]
    shared: str | None = None
    shared_gate: str | None = None
    router_bias: str | None = None

    def block_class(self) -> type[nn.Module]:
        module = importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        return getattr(module, self.block)


def _activation(config) -> str:
    act = config.hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"from_transformers: {type(config).__name__}.hidden_act={act!r} has no moezoo expert activation; "
            f"supported: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def _no_bias_update(config, bias_update_rate: float) -> None:
    if bias_update_rate:
        raise ValueError(
            f"from_transformers: bias_update_rate={bias_update_rate} needs a router with selection biases "
            f"(DeepSeek-V3's e_score_correction_bias); {config.model_type} has none"
        )


def _softmax_top_k(experts_key: str, hidden_key: str, *, always_normalize: bool = False, shared: bool = False):
    """Builder of the softmax top-k architectures (Mixtral, Qwen2/3-MoE, OLMoE)."""

    def build(config, bias_update_rate: float) -> tuple[nn.Module, dict]:
        _no_bias_update(config, bias_update_rate)
        experts = getattr(config, experts_key)
        normalize = always_normalize or bool(config.norm_topk_prob)
        router = TopKRouter(config.hidden_size, experts, config.num_experts_per_tok, normalize=normalize)
        jitter = getattr(config, "router_jitter_noise", 0.0)
        kwargs = dict(hidden=getattr(config, hidden_key), num_experts=experts, activation=_activation(config),
                      input_jitter=(jitter,) if jitter else (),
                      aux_loss_weights={POOLED_LOAD_BALANCING: config.router_aux_loss_coef})
        if shared:
            kwargs.update(shared_experts=1, shared_hidden=config.shared_expert_intermediate_size, shared_gate=True)
        return router, kwargs

    return build


def _deepseek_shared(config) -> dict:
    return dict(hidden=config.moe_intermediate_size, num_experts=config.n_routed_experts,
                activation=_activation(config), shared_experts=config.n_shared_experts,
                shared_hidden=config.moe_intermediate_size)


def _deepseek_v3(config, bias_update_rate: float) -> tuple[nn.Module, dict]:
    router = GroupLimitedRouter(
        config.hidden_size, config.n_routed_experts, config.num_experts_per_tok, num_groups=config.n_group,
        topk_group=config.topk_group, group_top=2, scores="sigmoid", normalize=bool(config.norm_topk_prob),
        normalize_eps=1e-20, scale=config.routed_scaling_factor, bias_update_rate=bias_update_rate,
    )
    return router, _deepseek_shared(config)


def _deepseek_v2(config, bias_update_rate: float) -> tuple[nn.Module, dict]:
    _no_bias_update(config, bias_update_rate)
    dim, experts, k = config.hidden_size, config.n_routed_experts, config.num_experts_per_tok
    if config.topk_method == "greedy":
        router = TopKRouter(dim, experts, k, scale=config.routed_scaling_factor)
    elif config.topk_method == "group_limited_greedy":
        router = GroupLimitedRouter(dim, experts, k, num_groups=config.n_group, topk_group=config.topk_group,
                                    group_top=1, scores="softmax", scale=config.routed_scaling_factor)
    else:
        raise ValueError(
            f"from_transformers: DeepseekV2Config.topk_method={config.topk_method!r} is not one transformers' "
            "DeepSeek-V2 router implements; supported: ['greedy', 'group_limited_greedy']"
        )
    return router, _deepseek_shared(config)


def _phimoe(config, bias_update_rate: float) -> tuple[nn.Module, dict]:
    _no_bias_update(config, bias_update_rate)
    if config.num_experts_per_tok != 2:
        raise ValueError(
            f"from_transformers: PhimoeConfig.num_experts_per_tok={config.num_experts_per_tok}, but PhiMoE's "
            "sparsemixer always routes 2 experts (and its auxiliary loss would count another k)"
        )
    router = SparseMixerRouter(config.hidden_size, config.num_local_experts, jitter_eps=config.router_jitter_noise)
    jitter = config.input_jitter_noise
    return router, dict(hidden=config.intermediate_size, num_experts=config.num_local_experts,
                        activation=_activation(config), input_jitter=(jitter, jitter) if jitter else (),
                        aux_loss_weights={POOLED_LOAD_BALANCING: config.router_aux_loss_coef})


#: The supported architectures by ``config.model_type``.
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("mixtral", "MixtralSparseMoeBlock", "gate",
                     _softmax_top_k("num_local_experts", "intermediate_size", always_normalize=True)),
        Architecture("qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate",
                     _softmax_top_k("num_experts", "moe_intermediate_size", shared=True),
                     shared="shared_expert", shared_gate="shared_expert_gate"),
        Architecture("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate",
                     _softmax_top_k("num_experts", "moe_intermediate_size")),
        Architecture("olmoe", "OlmoeSparseMoeBlock", "gate", _softmax_top_k("num_experts", "intermediate_size")),
        Architecture("deepseek_v3", "DeepseekV3MoE", "gate", _deepseek_v3, shared="shared_experts",
                     router_bias="e_score_correction_bias"),
        Architecture("deepseek_v2", "DeepseekV2Moe", "gate", _deepseek_v2, shared="shared_experts"),
        Architecture("phimoe", "PhimoeSparseMoeBlock", "router", _phimoe),
    )
}


def supported() -> list[str]:
    """The supported ``model_type`` names."""
    return sorted(ARCHITECTURES)
