"""The one way moezoo reaches the Hugging Face hub (its cache, ``HF_HUB_OFFLINE`` and ``HF_HOME`` apply)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["hub_download", "upload_folder"]


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


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                  revision: str | None = None, commit_message: str | None = None, create_pr: bool = False) -> str:
    """Upload every file of ``folder`` to the hub model repo ``repo_id`` in one commit, creating the
    repo first if it does not exist (``huggingface_hub.HfApi.create_repo`` and ``upload_folder``).

    Returns:
        The URL of the commit (of the pull request with ``create_pr``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload with moezoo", create_pr=create_pr)
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
