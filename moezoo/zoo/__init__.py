"""The zoo: registry, pretrained entries and checkpoint IO."""

from moezoo.zoo.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint, sha256_of
from moezoo.zoo.registry import (
    ModelEntry,
    PretrainedCfg,
    create_model,
    export_model,
    get_entry,
    list_models,
    register_model,
    register_shipped,
    shipped_weights,
)
from moezoo.zoo.upcycling import upcycle_vit

__all__ = [
    "CheckpointError",
    "ModelEntry",
    "PretrainedCfg",
    "create_model",
    "export_model",
    "get_entry",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register_model",
    "register_shipped",
    "save_checkpoint",
    "sha256_of",
    "shipped_weights",
    "upcycle_vit",
]
