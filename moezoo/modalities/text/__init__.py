"""Text: decoder-only LMs with MoA / SwitchHead attention and dense / MoE / σ-MoE MLPs, the language
modelling task and text data."""

from moezoo.modalities.text.data import TextDataModule, load_tokenizer, pydoc_topics_splits
from moezoo.modalities.text.model import TransformerLM, init_dense_attention, sigma_moe
from moezoo.modalities.text.task import LanguageModeling, lm_loss

__all__ = [
    "LanguageModeling",
    "TextDataModule",
    "TransformerLM",
    "init_dense_attention",
    "lm_loss",
    "load_tokenizer",
    "pydoc_topics_splits",
    "sigma_moe",
]
