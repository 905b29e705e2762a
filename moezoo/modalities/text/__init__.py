"""Text: decoder-only LMs with MoA / SwitchHead attention and dense / MoE / σ-MoE MLPs (RoPE, or
Transformer-XL positions with segment memory), the language modelling task, fine-tuning of
transformers MoE causal LMs and text data; MoA's encoder-decoder translation model, task and
parallel data."""

from moezoo.modalities.text.data import TextDataModule, load_tokenizer, pydoc_topics_splits
from moezoo.modalities.text.model import TransformerLM, prenorm_init_, sigma_moe
from moezoo.modalities.text.parallel_data import ParallelTextDataModule
from moezoo.modalities.text.segments import SegmentLanguageModeling, SegmentTextDataModule
from moezoo.modalities.text.seq2seq import MoATransformer
from moezoo.modalities.text.task import CausalLMFineTuning, LanguageModeling, lm_loss
from moezoo.modalities.text.translation import Translation

__all__ = [
    "CausalLMFineTuning",
    "LanguageModeling",
    "MoATransformer",
    "ParallelTextDataModule",
    "SegmentLanguageModeling",
    "SegmentTextDataModule",
    "TextDataModule",
    "TransformerLM",
    "Translation",
    "lm_loss",
    "load_tokenizer",
    "prenorm_init_",
    "pydoc_topics_splits",
    "sigma_moe",
]
