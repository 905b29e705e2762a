"""The one way moezoo reaches the Hugging Face hub (its cache, ``HF_HUB_OFFLINE`` and ``HF_HOME`` apply)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["hub_download"]


def hub_download(repo_id: str, filename: str | None = None, *, revision: str | None = None,
                 allow_patterns: list[str] | None = None, **hub_kwargs: Any) -> Path:
    """A local path to ``filename`` of hub repo ``repo_id``, or to the repo's folder (only the files
    matching ``allow_patterns``) when ``filename`` is None, downloaded once into the hub cache.

    ``hub_kwargs`` go to ``huggingface_hub`` (``cache_dir``, ``token``, ``local_files_only``, ...).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if filename is not None:
        return Path(hf_hub_download(repo_id, filename, revision=revision, **hub_kwargs))
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, **hub_kwargs))
