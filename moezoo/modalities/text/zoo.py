"""Text zoo entries: tiny byte-level LMs trained by configs/text (shipped weights) and the papers' scales."""

from __future__ import annotations

from moezoo.modalities.text.model import TransformerLM
from moezoo.zoo.registry import register_model, shipped_weights

#: Shared by the tiny entries: byte vocabulary, width 128, 4 blocks, context 128 (configs/text/lm_*_pydoc.yaml).
TINY = dict(vocab_size=256, dim=128, depth=4, context_length=128)

TINY_ENTRIES = {
    "lm_dense_pydoc": (
        "Dense byte-level LM (4 heads x 32, ReLU MLP 512) on CPython's pydoc topics; the baseline",
        dict(attention="dense", num_heads=4, head_dim=32, mlp="dense", mlp_hidden=512),
        "Pre-LN decoder, 4 blocks, width 128, byte vocabulary (256), context 128, RoPE on half of each "
        "head's channels. Attention: 4 heads of 32 (16 attention maps per sequence). MLP: ReLU 128 -> 512 -> "
        "128 without biases.",
        ["dense-baseline"],
    ),
    "lm_dense_h2_pydoc": (
        "Dense byte-level LM with 2 heads x 32 (lm_switchhead_pydoc's head count, fewer parameters)",
        dict(attention="dense", num_heads=2, head_dim=32, mlp="dense", mlp_hidden=512),
        "As lm_dense_pydoc with 2 heads of 32 (8 attention maps per sequence): the head-matched baseline of "
        "SwitchHead.",
        ["dense-baseline"],
    ),
    "lm_moa_pydoc": (
        "Mixture of Attention Heads byte-level LM (8 experts of d=28, 2 per token), parameter-matched to lm_dense_pydoc",
        dict(attention="moa", attention_experts=8, attention_k=2, head_dim=28, mlp="dense", mlp_hidden=512),
        "As lm_dense_pydoc with MoA attention (Zhang et al. 2022): 8 experts, each its own query and output "
        "projection (128 <-> 28), one shared key and value projection (128 -> 28), a zero-initialised softmax "
        "router picks 2 experts per token (weights not renormalised), so 8 attention maps per sequence. "
        "Losses: Switch load balancing 0.01, z-loss 0.001 (the reference's coefficients, here added to the "
        "token-mean cross-entropy; the reference adds them to the token-summed one, i.e. divides them by the "
        "tokens per batch).",
        ["moa", "mixture-of-attention-heads"],
    ),
    "lm_switchhead_pydoc": (
        "SwitchHead byte-level LM (2 heads x 32, 3 V/O experts per head, 2 active), parameter-matched to lm_dense_pydoc",
        dict(attention="switchhead", num_heads=2, head_dim=32, attention_experts=3, attention_k=2, mlp="dense",
             mlp_hidden=512),
        "As lm_dense_pydoc with SwitchHead attention (Csordas et al. 2024): 2 heads of 32 (8 attention maps per "
        "sequence); dense Q and K; value and output projections are 3 experts per head, 2 chosen per head "
        "and token by sigmoid scores (V from the source token, O from the destination token), weights not "
        "renormalised; no regulariser (as the paper).",
        ["switchhead", "moe-attention"],
    ),
    "lm_sigma_moe_pydoc": (
        "sigma-MoE byte-level LM: dense attention, MLP of 8 ReLU experts x 64 with 2 active (param-matched)",
        dict(attention="dense", num_heads=4, head_dim=32, mlp="sigma_moe", mlp_experts=8, mlp_hidden=64, mlp_k=2,
             sigma_moe_entropy=1e-3),
        "As lm_dense_pydoc with the MLP replaced by a sigma-MoE (Csordas et al. 2023): 8 ReLU experts of width 64 "
        "(total 512, as the dense MLP), 2 chosen per token by sigmoid scores, not renormalised; entropy "
        "regularisation 1e-3; the paper's initialisation.",
        ["sigma-moe", "mixture-of-experts"],
    ),
}

for name, (description, args, architecture, tags) in TINY_ENTRIES.items():
    register_model(
        name,
        TransformerLM,
        modality="text",
        description=description,
        pretrained_cfg=shipped_weights(
            name,
            license="apache-2.0",
            input_spec={"tokenizer": "bytes (UTF-8, vocabulary 256)", "context_length": 128},
            card=f"model_cards/{name}.md",
        ),
        evaluate="moezoo.modalities.text.evaluate:evaluate_pydoc",
        card={
            "config": f"configs/text/{name}.yaml",
            "dataset_name": "CPython pydoc_data.topics (byte-level; validation = every 10th topic from the 4th)",
            "datasets": ["pydoc-topics"],
            "split": "validation",
            "tags": ["moezoo", "language-modeling", *tags],
            "task": "text-generation",
            "card_metrics": ["perplexity", "bits_per_byte"],
            "architecture": architecture,
            "limitations": (
                "A demonstration-scale model: 398 k training bytes of Python documentation, 600 steps on a CPU. "
                "The corpus is CPython's pydoc_data.topics, whose text changes between CPython minor versions "
                "(figures were measured on 3.11). Weights ship in float16."
            ),
        },
        **TINY,
        **args,
    )

#: The SwitchHead paper's small scale (~47M, RobertCsordas/moe_attention sweeps): width 412, 16 pre-LN
#: layers, context 256, SentencePiece 8k vocabulary, dropout 0.1. Positions: the reference's RoPE
#: variant (half of each head rotated) instead of the paper tables' Transformer-XL encoding.
PAPER_SMALL = dict(vocab_size=8000, dim=412, depth=16, context_length=256, dropout=0.1, rotate_fraction=0.5)

register_model(
    "transformer_47m_wt103",
    TransformerLM,
    modality="text",
    description="Dense baseline of the SwitchHead/sigma-MoE papers' 47M WikiText-103 scale (10 heads x 41, d_ff 2053)",
    attention="dense", num_heads=10, head_dim=41, mlp="dense", mlp_hidden=2053, **PAPER_SMALL,
)
register_model(
    "switchhead_47m_wt103",
    TransformerLM,
    modality="text",
    description="SwitchHead at the paper's 47M WikiText-103 scale (2 heads x 76, E=5, k=2, d_ff 2080)",
    attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=2, mlp="dense",
    mlp_hidden=2080, **PAPER_SMALL,
)
register_model(
    "switchhead_47m_c4",
    TransformerLM,
    modality="text",
    description="SwitchHead at the paper's 47M C4 scale (2 heads x 76, E=5, k=3, d_ff 2080)",
    attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=3, mlp="dense",
    mlp_hidden=2080, **PAPER_SMALL,
)
register_model(
    "sigma_moe_47m_wt103",
    TransformerLM,
    modality="text",
    description="sigma-MoE at the paper's 47M WikiText-103 scale (dense attention 10 x 41; E=16, G=128, K=4, gamma 1e-3)",
    attention="dense", num_heads=10, head_dim=41, mlp="sigma_moe", mlp_experts=16, mlp_hidden=128, mlp_k=4,
    sigma_moe_entropy=1e-3, **PAPER_SMALL,
)
register_model(
    "switchall_47m_wt103",
    TransformerLM,
    modality="text",
    description="SwitchAll (SwitchHead + sigma-MoE MLP) at the 47M WikiText-103 scale (E=16, G=128, K=4, gamma 1e-4)",
    attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=2, mlp="sigma_moe",
    mlp_experts=16, mlp_hidden=128, mlp_k=4, sigma_moe_entropy=1e-4, **PAPER_SMALL,
)
