"""Tiny random transformers MoE causal LMs of every architecture moezoo converts, built from configs
(nothing is downloaded), with weights large enough that routing decisions and logits are not trivial."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEEPSEEK = dict(intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                 topk_group=2, n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=8,
                 q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=2)

#: model_type -> config overrides.
CONFIGS = {
    "mixtral": dict(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                      num_hidden_layers=3),
    "qwen3_moe": dict(intermediate_size=24, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=8),
    "olmoe": dict(intermediate_size=12, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(_DEEPSEEK, routed_scaling_factor=2.5),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "phimoe": dict(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3),
}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` in fp32 evaluation mode. DeepSeek-V3's
    selection biases are random (transformers initialises them to 0), so that they change choices."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    return model


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
