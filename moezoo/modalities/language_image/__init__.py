"""Language-image: LIMoE, the contrastive task, image-text data and zero-shot evaluation."""

from moezoo.modalities.language_image.data import ImageTextDataModule, build_tokenizer, class_prompts, render_glyphs
from moezoo.modalities.language_image.evaluate import (
    evaluate_image_text,
    expert_modality_shares,
    retrieval_recall,
    zero_shot_accuracy,
)
from moezoo.modalities.language_image.model import LIMOE_LOSS_WEIGHTS, LIMoE, contrastive_loss
from moezoo.modalities.language_image.task import ContrastiveImageText

__all__ = [
    "ContrastiveImageText",
    "ImageTextDataModule",
    "LIMOE_LOSS_WEIGHTS",
    "LIMoE",
    "build_tokenizer",
    "class_prompts",
    "contrastive_loss",
    "evaluate_image_text",
    "expert_modality_shares",
    "render_glyphs",
    "retrieval_recall",
    "zero_shot_accuracy",
]
