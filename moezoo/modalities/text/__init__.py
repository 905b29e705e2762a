"""Text: decoder-only LMs with MoA / SwitchHead attention and dense / MoE / σ-MoE MLPs, the language
modelling task, fine-tuning of transformers MoE causal LMs, and text data."""

from moezoo.modalities.text.data import TextDataModule, load_tokenizer, pydoc_topics_splits
from moezoo.modalities.text.model import TransformerLM, init_dense_attention, sigma_moe
from moezoo.modalities.text.task import CausalLMFineTuning, LanguageModeling, lm_loss

__all__ = [
    "CausalLMFineTuning",
    "LanguageModeling",
    "TextDataModule",
    "TransformerLM",
    "init_dense_attention",
    "lm_loss",
    "load_tokenizer",
    "pydoc_topics_splits",
    "sigma_moe",
]
