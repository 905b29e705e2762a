"""Text zoo entries: tiny byte-level LMs trained by configs/text (shipped weights) and the papers' scales."""

from __future__ import annotations

from moezoo.modalities.text.model import TransformerLM
from moezoo.zoo.registry import ShippedEvaluation, register_model, register_shipped

#: Shared by the tiny entries: byte vocabulary, width 128, 4 blocks, context 128 (configs/text/lm_*_pydoc.yaml).
TINY = dict(vocab_size=256, dim=128, depth=4, context_length=128, mlp_bias=False, head_bias=False)

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

_PYDOC_VALIDATION = ShippedEvaluation(
    "moezoo.modalities.text.evaluate:evaluate_pydoc", task="text-generation", split="validation",
    dataset_name="CPython pydoc_data.topics (byte-level; validation = every 10th topic from the 4th)",
    datasets=("pydoc-topics",), card_metrics=("perplexity", "bits_per_byte"))

for name, (description, args, architecture, tags) in TINY_ENTRIES.items():
    register_shipped(
        name,
        TransformerLM,
        modality="text",
        input_spec={"tokenizer": "bytes (UTF-8, vocabulary 256)", "context_length": 128},
        description=description,
        evaluation=_PYDOC_VALIDATION,
        tags=["language-modeling", *tags],
        architecture=architecture,
        limitations=(
            "A demonstration-scale model: 398 k training bytes of Python documentation, 600 steps on a CPU. "
            "The corpus is CPython's pydoc_data.topics, whose text changes between CPython minor versions "
            "(figures were measured on 3.11). Weights ship in float16. "
            "These weights predate issue 24's changes to the text LMs (the authors' initialisation, MLP and "
            "head biases): the entry and its config keep the earlier architecture so they load; a fresh fit "
            "of the config starts from the authors' initialisation (README: the re-measured columns, "
            "benchmarks/results/text_attention_moe_retrained.json)."
        ),
        **TINY,
        **args,
    )

#: The SwitchHead/σ-MoE papers' scales as the authors' sweeps have them (configs/text/*_47m_*.yaml,
#: *_262m_*.yaml cite each sweep): pre-LN, SentencePiece 8k vocabulary, Transformer-XL relative positions
#: with the previous segment as memory; small: width 412, 16 layers, context 256, dropout 0.1; big: width
#: 1024, 18 layers, context 512, dropout 0.2. No weights (the papers released none).
PAPER_SMALL = dict(vocab_size=8000, dim=412, depth=16, context_length=256, dropout=0.1, positions="xl",
                   memory_length=256)
PAPER_BIG = dict(vocab_size=8000, dim=1024, depth=18, context_length=512, dropout=0.2, positions="xl",
                 memory_length=512)

PAPER_ENTRIES = {
    "transformer_47m_wt103": (
        "Dense Transformer-XL baseline of the SwitchHead/sigma-MoE papers' 47M WikiText-103 scale (10 heads x 41, d_ff 2053)",
        dict(attention="dense", num_heads=10, head_dim=41, mlp="dense", mlp_hidden=2053, **PAPER_SMALL)),
    "switchhead_47m_wt103": (
        "SwitchHead at the paper's 47M WikiText-103 scale (2 heads x 76, E=5, k=2, d_ff 2080)",
        dict(attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=2, mlp="dense",
             mlp_hidden=2080, **PAPER_SMALL)),
    "switchhead_47m_c4": (
        "SwitchHead at the paper's 47M C4 scale (2 heads x 76, E=5, k=3, d_ff 2080)",
        dict(attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=3, mlp="dense",
             mlp_hidden=2080, **PAPER_SMALL)),
    "sigma_moe_47m_wt103": (
        "sigma-MoE at the paper's 47M WikiText-103 scale (dense XL attention 10 x 41; E=16, G=128, K=4, gamma 1e-3)",
        dict(attention="dense", num_heads=10, head_dim=41, mlp="sigma_moe", mlp_experts=16, mlp_hidden=128, mlp_k=4,
             sigma_moe_entropy=1e-3, **PAPER_SMALL)),
    "switchall_47m_wt103": (
        "SwitchAll (SwitchHead + sigma-MoE MLP) at the 47M WikiText-103 scale (E=16, G=128, K=4, gamma 1e-4)",
        dict(attention="switchhead", num_heads=2, head_dim=76, attention_experts=5, attention_k=2, mlp="sigma_moe",
             mlp_experts=16, mlp_hidden=128, mlp_k=4, sigma_moe_entropy=1e-4, **PAPER_SMALL)),
    "transformer_262m_wt103": (
        "Dense Transformer-XL baseline of the SwitchHead paper's 262M WikiText-103 scale (16 heads x 64, d_ff 4110)",
        dict(attention="dense", num_heads=16, head_dim=64, mlp="dense", mlp_hidden=4110, **PAPER_BIG)),
    "switchhead_262m_wt103": (
        "SwitchHead at the paper's 262M WikiText-103 scale (2 heads x 132, E=8, k=4, d_ff 4147)",
        dict(attention="switchhead", num_heads=2, head_dim=132, attention_experts=8, attention_k=4, mlp="dense",
             mlp_hidden=4147, **PAPER_BIG)),
    "switchhead_262m_c4": (
        "SwitchHead at the paper's 262M C4 scale, the abstract's model (4 heads x 112, E=4, k=2, d_ff 4188)",
        dict(attention="switchhead", num_heads=4, head_dim=112, attention_experts=4, attention_k=2, mlp="dense",
             mlp_hidden=4188, **PAPER_BIG)),
    "sigma_moe_262m_wt103": (
        "sigma-MoE at the paper's 262M WikiText-103 scale (dense XL attention 16 x 64; E=32, G=128, K=4, expert dropout 0.1)",
        dict(attention="dense", num_heads=16, head_dim=64, mlp="sigma_moe", mlp_experts=32, mlp_hidden=128, mlp_k=4,
             mlp_expert_dropout=0.1, sigma_moe_entropy=1e-3, **PAPER_BIG)),
}

#: The paper entries' card text: what matches the official code and what does not (README, "Paper
#: fidelity of the text LMs", lists the tests).
PAPER_FIDELITY = (
    "No weights and no measurement: built for GPU users from the authors' sweeps "
    "(RobertCsordas/moe_attention, RobertCsordas/moe). As the official code: Transformer-XL relative "
    "positions with the previous segment as memory, the authors' pre-LN initialisation (attention "
    "sqrt(2/L), sigma-MoE depth scaling), the dense feed-forward with biases and hidden dropout, "
    "sigma-MoE's entropy regulariser over every process's tokens, gradient clipping 0.1; the parameter "
    "count is within 2 % of the paper's (tests/modalities/test_text_paper.py). Differences, listed in the "
    "config header: bf16 instead of float16 autocast, the batch size is per process, and the "
    "SentencePiece model and token stream are the user's."
)

for name, (description, args) in PAPER_ENTRIES.items():
    register_model(name, TransformerLM, modality="text", description=description,
                   card={"limitations": PAPER_FIDELITY}, **args)
