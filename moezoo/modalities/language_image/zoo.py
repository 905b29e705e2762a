"""Language-image zoo entries."""

from __future__ import annotations

import math

from moezoo.modalities.language_image.model import LIMoE
from moezoo.zoo.registry import ShippedEvaluation, register_model, register_shipped

#: The model of configs/language_image/limoe_ti_glyphs.yaml.
LIMOE_TI_GLYPHS = dict(
    img_size=32, patch_size=4, in_chans=1, vocab_size=128, max_text_len=16, embed_dim=96, depth=6, num_heads=3,
    mlp_ratio=4.0, proj_dim=64, moe_blocks="every_2", num_experts=8, k=1, capacity_factor=1.05,
    batch_priority=True, entropy_thresholds={"text": math.log(2.0)},
)

register_model(
    "limoe_b16",
    LIMoE,
    modality="language_image",
    description="LIMoE-B/16: shared ViT-B/16 tower for 224px images and text, 8 experts top-1 every 2nd block",
    img_size=224, patch_size=16, in_chans=3, vocab_size=32000, max_text_len=16, embed_dim=768, depth=12,
    num_heads=12, proj_dim=768, moe_blocks="every_2", num_experts=8, k=1,
    card={"limitations": (
        "No weights and no measurement. Auxiliary losses: V-MoE's importance and load at 0.005 each "
        "(google-research/vmoe vmoe/configs/vmoe_paper/common.py); LIMoE's local and global entropy losses "
        "at 0.01 each with the text global entropy thresholded at log 2, which are moezoo's values for the "
        "tiny glyphs entry: the paper's entropy-loss weights and thresholds were not found (arXiv "
        "2206.02770 not recovered beyond its introduction; LIMoE's training code is not public). In "
        "training the entropy losses are over every process's tokens, as the paper defines them over the "
        "batch."
    )},
)

_GLYPHS_TEST = ShippedEvaluation(
    "moezoo.modalities.language_image.evaluate:evaluate_glyphs", task="zero-shot-image-classification", split="test",
    dataset_name="built-in glyphs (62 letters and digits in matplotlib's 21 text fonts; test = 3 unseen fonts)",
    datasets=("moezoo-glyphs",), card_metrics=("zero_shot_accuracy", "i2t_recall@1", "t2i_recall@1"))

register_shipped(
    "limoe_ti_glyphs",
    LIMoE,
    modality="language_image",
    input_spec={"image_size": 32, "channels": 1, "pixel_range": "[-1, 1]", "max_text_len": 16,
                "tokenizer": "moezoo.modalities.language_image.build_tokenizer over the built-in captions"},
    description="LIMoE-Ti on built-in captioned glyphs (62 characters x 21 fonts), 8 experts top-1 every 2nd block",
    evaluation=_GLYPHS_TEST,
    tags=["mixture-of-experts", "limoe", "contrastive", "zero-shot-image-classification"],
    architecture=(
        "One transformer tower (width 96, 6 pre-LN blocks, 3 heads) shared by 32x32 grey images (4x4 "
        "patches, 64 tokens) and text (word-level tokenizer built from the captions, up to 16 tokens); "
        "modality-specific embeddings, mean pooling and projection heads (64-d), CLIP-style contrastive "
        "loss with a learned temperature. Blocks 1, 3 and 5 hold a MultimodalMoE: 8 experts (96 -> 384 "
        "-> 96, GELU), V-MoE's Batch Prioritized Router with k=1 and C=1.05 applied per modality (image "
        "and text tokens have separate expert buffers). Losses per modality: importance and load "
        "(0.005 each) and LIMoE's local entropy and global entropy (0.01 each; text's global entropy "
        "thresholded at log 2). Importance and load weights are V-MoE's (google-research/vmoe "
        "vmoe/configs/vmoe_paper/common.py); the entropy weights and the threshold are moezoo's: LIMoE's "
        "own values were not found (arXiv 2206.02770 not recovered beyond its introduction; LIMoE's "
        "training code is not public). In training the entropy losses are over every process's tokens."
    ),
    limitations=(
        "A demonstration-scale model on 930 training pairs whose captions are templated (character, font "
        "family, style); zero-shot prompts use held-out templates and the test fonts are unseen, but the "
        "vocabulary is tiny. Retrieval is among the 186 test pairs. Weights ship in float16."
    ),
    **LIMOE_TI_GLYPHS,
)
