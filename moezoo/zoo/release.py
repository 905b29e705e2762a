"""Ship a trained zoo entry: weights into the package, evaluation JSON, model card."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moezoo.zoo.cards import REPO_ROOT, results_path, write_card
from moezoo.zoo.checkpoint import load_checkpoint, save_checkpoint, sha256_of
from moezoo.zoo.hf import DTYPES
from moezoo.zoo.registry import get_entry

__all__ = ["evaluate_entry", "release"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_DTYPES = {name: DTYPES[name] for name in ("float32", "float16", "bfloat16")}


def evaluate_entry(name: str, checkpoint: str | os.PathLike | None = None, **options) -> dict[str, float]:
    """The entry's headline metrics, with its published weights or ``checkpoint``; ``options`` go
    to the entry's evaluation function (e.g. ``data_dir`` for data on disk)."""
    from moezoo.zoo.registry import create_model

    entry = get_entry(name)
    model = create_model(name, pretrained=checkpoint is None, checkpoint_path=checkpoint)
    return entry.evaluator()(model, **options)


def release(name: str, checkpoint: str | os.PathLike, *, dtype: str = "float16", root: Path = REPO_ROOT) -> dict:
    """Store ``checkpoint``'s weights as ``moezoo/zoo/weights/<name>.safetensors`` (cast to ``dtype``
    to keep the package small), record its sha256 in the weights index, evaluate the stored weights,
    write ``model_cards/results/<name>.json`` and render the card.

    Returns:
        The results record.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    entry = get_entry(name)
    model = entry.builder(**entry.default_args)
    load_checkpoint(model, checkpoint, entry=name, adapter=entry.checkpoint_adapter)
    state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    target = save_checkpoint(state, WEIGHTS_DIR / f"{name}.safetensors", metadata={"entry": name, "dtype": dtype})
    digest = sha256_of(target)
    index_file = WEIGHTS_DIR / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}

    # Evaluate exactly what ships: the stored (rounded) weights, checked against their hash.
    shipped = entry.builder(**entry.default_args)
    load_checkpoint(shipped, target, sha256=digest, entry=name, adapter=entry.checkpoint_adapter)
    metrics = entry.evaluator()(shipped)
    # The card's headline figures travel with the weights (PretrainedCfg.metrics of the entry).
    headline = {k: metrics[k] for k in entry.card.get("card_metrics", list(metrics))}
    index[name] = {"file": target.name, "sha256": digest, "dtype": dtype, "metrics": headline}
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    record = {
        "entry": name,
        "dataset": entry.card.get("dataset_name", "-"),
        "split": entry.card.get("split", "test"),
        "metrics": metrics,
        "weights": {"file": f"moezoo/zoo/weights/{target.name}", "sha256": digest, "dtype": dtype},
        "commands": {
            "train": f"moezoo fit --config {entry.card.get('config', '<config>')}",
            "release": f"moezoo zoo release {name} --ckpt <the checkpoint of that run>",
            "evaluate": f"moezoo zoo eval {name}",
        },
    }
    path = results_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    write_card(entry, root)
    return record
