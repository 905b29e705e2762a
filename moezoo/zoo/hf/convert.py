"""``from_transformers``: a transformers MoE causal LM's sparse blocks become moezoo MoE layers, in place."""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from moezoo.layers.expert_parallel import expert_shards
from moezoo.routers.sigmoid import SigmoidRouter
from moezoo.zoo.checkpoint import StateDictAdapter
from moezoo.zoo.hf.architectures import ARCHITECTURES, Architecture, supported
from moezoo.zoo.hf.layer import TransformersMoE
from moezoo.zoo.hf.layout import block_from_transformers, transformers_layout

__all__ = ["from_config", "from_pretrained", "from_transformers"]


def _architecture(model: nn.Module) -> Architecture:
    from transformers import PreTrainedModel

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in ARCHITECTURES:
        raise ValueError(
            f"from_transformers: {type(model).__name__} (model_type {model_type!r}) is not a supported transformers "
            f"MoE model; supported model types: {supported()}"
        )
    return ARCHITECTURES[model_type]


def _zero_bias(layer: TransformersMoE, arch: Architecture) -> bool:
    """Whether the layer's router has selection biases the architecture lacks (they start at 0)."""
    return isinstance(layer.router, SigmoidRouter) and arch.router_bias is None


def _convert_block(block: nn.Module, arch: Architecture, config, backend: str, bias_update_rate: float
                   ) -> TransformersMoE:
    """The moezoo layer holding ``block``'s weights (the same tensors where the layout allows)."""
    with torch.device("meta"):  # nothing is allocated until the block's own tensors are assigned
        router, kwargs = arch.build(config, bias_update_rate)
        layer = TransformersMoE(config.hidden_size, router=router, gated=True, bias=False, backend=backend, **kwargs)
    state = block_from_transformers(block.state_dict(), arch, zero_bias=_zero_bias(layer, arch))
    layer.load_state_dict(state, assign=True)
    return layer.train(block.training)


def _save_pretrained(layout: StateDictAdapter, model, save_directory, *args, state_dict=None, **kwargs):
    """transformers' ``save_pretrained``, given the state dict in transformers' layout: its files
    load with plain transformers, no moezoo needed."""
    if expert_shards(model):
        raise ValueError(
            "save_pretrained: the experts are sharded over expert-parallel ranks; save a single-process copy "
            "(or a checkpoint of ExpertParallel, which gathers them)"
        )
    state = layout.to_foreign(dict(model.state_dict() if state_dict is None else state_dict))
    return type(model).save_pretrained(model, save_directory, *args, state_dict=state, **kwargs)


def from_transformers(model: nn.Module, *, backend: str = "auto", bias_update_rate: float = 0.0) -> nn.Module:
    """Replace every sparse MoE block of a transformers 5.x model with moezoo's MoE layer, in place.

    Each block becomes a :class:`~moezoo.zoo.hf.layer.TransformersMoE`: a moezoo router with the
    block's routing semantics (see :mod:`moezoo.zoo.hf.architectures`), the expert bank
    (:class:`~moezoo.layers.experts.Experts`, SwiGLU, no biases) and the shared experts, holding the
    block's weights. The model computes what it computed (fp32, evaluation: the same logits to
    rounding), and everything of moezoo applies to it: :func:`moezoo.aux_loss` (the model's own
    auxiliary loss and coefficient, in training whatever ``output_router_logits`` says), the
    recipes, the routing monitor and report, expert parallelism, the Triton backend. transformers'
    own features keep working: ``output_router_logits=True`` (the logits are supplied by the new
    layers), ``generate`` with the KV cache, gradient checkpointing. ``model.save_pretrained(dir)``
    writes transformers' own layout (the model's ``save_pretrained`` is wrapped to convert the
    state dict at that boundary; its ``state_dict()`` is moezoo's).

    Converting a converted model returns it unchanged.

    Args:
        model: a transformers model of a supported ``config.model_type`` (:func:`supported`).
        backend: the expert bank's backend, "auto", "torch" or "triton".
        bias_update_rate: DeepSeek-V3 only: the loss-free balancing rate that updates
            ``e_score_correction_bias`` once per optimiser step (0: fixed, as in transformers).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: naming the class and listing the supported model types for any other model; or
            when the model has no MoE block (e.g. every layer dense), or its config asks for
            something transformers' block computes and moezoo's layer cannot.
    """
    arch = _architecture(model)
    block_class = arch.block_class()
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, block_class)]
    if not blocks:
        if any(isinstance(m, TransformersMoE) for m in model.modules()):
            return model
        raise ValueError(
            f"from_transformers: {type(model).__name__} has no {arch.block} (no MoE block: every layer is dense), "
            "so there is nothing to convert"
        )
    for name, block in blocks:
        layer = _convert_block(block, arch, model.config, backend, bias_update_rate)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    layout = transformers_layout(arch, zero_bias=_zero_bias(layer, arch))
    model.save_pretrained = types.MethodType(functools.partial(_save_pretrained, layout), model)
    return model


def from_pretrained(name_or_path: str, *, backend: str = "auto", bias_update_rate: float = 0.0,
                    **kwargs) -> nn.Module:
    """``transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)``, converted by
    :func:`from_transformers` (a local folder, or a hub id in the cache or downloadable)."""
    from transformers import AutoModelForCausalLM

    return from_transformers(AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs), backend=backend,
                             bias_update_rate=bias_update_rate)


def from_config(config, *, backend: str = "auto", bias_update_rate: float = 0.0, **kwargs) -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM.from_config(config, **kwargs)``, converted.

    Args:
        config: a transformers config, or a mapping with ``model_type`` and its fields.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        fields = dict(config)
        if "model_type" not in fields:
            raise ValueError(f"from_config: a config mapping needs model_type (one of {supported()}), got {sorted(fields)}")
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return from_transformers(AutoModelForCausalLM.from_config(config, **kwargs), backend=backend,
                             bias_update_rate=bias_update_rate)
