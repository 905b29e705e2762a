"""transformers MoE causal LMs inside moezoo: :func:`from_transformers` converts their sparse blocks to
moezoo MoE layers in place; ``save_pretrained`` writes transformers' layout back. Also Hugging Face's
``from_pretrained`` keyword conventions (``dtype``/``torch_dtype``, ``device_map``) for moezoo's own models."""

from moezoo.zoo.hf.architectures import ARCHITECTURES, Architecture, supported
from moezoo.zoo.hf.convert import from_config, from_pretrained, from_transformers
from moezoo.zoo.hf.layer import TransformersMoE
from moezoo.zoo.hf.layout import transformers_layout
from moezoo.zoo.hf.pretrained_kwargs import DTYPES, resolve_device, resolve_dtype

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "Architecture",
    "TransformersMoE",
    "from_config",
    "from_pretrained",
    "from_transformers",
    "resolve_device",
    "resolve_dtype",
    "supported",
    "transformers_layout",
]
