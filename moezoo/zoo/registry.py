"""The model registry: ``register_model``, ``create_model``, ``list_models`` (timm-style)."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from moezoo.zoo.checkpoint import CheckpointError, StateDictAdapter, load_checkpoint

__all__ = [
    "ModelEntry",
    "PretrainedCfg",
    "create_model",
    "download_url",
    "export_model",
    "get_entry",
    "list_models",
    "load_pretrained",
    "register_model",
    "shipped_weights",
    "url_cache_path",
]

_SOURCE_KINDS = ("package", "hf-hub", "url", "file")


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a zoo entry's weights come from and what they expect.

    Args:
        source: ``"package:<path inside moezoo/zoo>"`` (shipped with moezoo),
            ``"hf-hub:<repo id>[:<filename>]"`` (through huggingface_hub, honouring HF_HUB_OFFLINE
            and its cache), ``"url:<https address>"`` or ``"file:<local path>"``.
        sha256: hex digest of the weights file (checked before loading), or None.
        license: license of the weights.
        input_spec: what the model expects (image size and normalisation, sample rate, context
            length, tokenizer, ...).
        card: model card path relative to the repository (``model_cards/<entry>.md``).
        metrics: headline evaluation figures (copied from the card's evaluation JSON).
        converter: ``"module:function"`` for weights published in a foreign format: called with
            this cfg, it fetches them (with :func:`download_url`), converts them once to a
            safetensors file in the download cache and returns that file's path.
    """

    source: str
    sha256: str | None = None
    license: str | None = None
    input_spec: dict[str, Any] = field(default_factory=dict)
    card: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    converter: str | None = None

    def __post_init__(self) -> None:
        kind = self.source.split(":", 1)[0]
        if ":" not in self.source or kind not in _SOURCE_KINDS:
            raise ValueError(f"PretrainedCfg.source must start with one of {_SOURCE_KINDS} and ':', got {self.source!r}")

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    def resolve(self) -> Path:
        """A local path to the weights, downloading (or reading the hub cache) when needed."""
        if self.converter is not None:
            module, _, function = self.converter.partition(":")
            return Path(getattr(importlib.import_module(module), function)(self))
        kind, rest = self.source.split(":", 1)
        if kind == "package":
            return Path(str(resources.files("moezoo.zoo").joinpath(rest)))
        if kind == "file":
            return Path(os.path.expanduser(rest))
        if kind == "hf-hub":
            from moezoo.zoo.hub import hub_download

            repo, _, filename = rest.partition(":")
            return hub_download(repo, filename or None, allow_patterns=["*.json", "*.safetensors"])
        return download_url(rest, sha256=self.sha256)


def url_cache_path(url: str) -> Path:
    """Where :func:`download_url` keeps ``url``: ``<torch hub dir>/moezoo/<url key>/<file name>``.

    Keyed by the whole URL: two entries whose files share a name must not share a cache file.
    """
    from torch.hub import get_dir

    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(get_dir()) / "moezoo" / url_key / Path(url).name


def download_url(url: str, target: Path | None = None, *, sha256: str | None = None) -> Path:
    """``url`` as a local file (``target``, default :func:`url_cache_path`), downloaded once.

    torch's downloader writes a temporary file and renames it when complete (and checks the
    sha256 prefix when given), so an interrupted download leaves no file at ``target``.
    """
    from torch.hub import download_url_to_file

    target = url_cache_path(url) if target is None else Path(target)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, str(target), hash_prefix=sha256, progress=True)
    return target


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it, where its weights are, how to evaluate it.

    Attributes:
        evaluate: ``"module:function"`` taking the model and returning its headline metrics.
        card: model-card information (license, tags, datasets, config, architecture, limitations).
        checkpoint_adapter: converts a foreign checkpoint layout (e.g. the upstream one of public
            weights) into the model's state-dict names, at load time (timm's ``pretrained_filter_fn``).
    """

    name: str
    builder: Callable[..., nn.Module]
    modality: str
    default_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: PretrainedCfg | None = None
    description: str = ""
    evaluate: str | None = None
    card: dict[str, Any] = field(default_factory=dict)
    checkpoint_adapter: StateDictAdapter | None = None

    def evaluator(self) -> Callable[[nn.Module], dict[str, float]]:
        if self.evaluate is None:
            raise ValueError(f"model {self.name!r} has no evaluation function")
        module, _, function = self.evaluate.partition(":")
        return getattr(importlib.import_module(module), function)


_WEIGHTS_INDEX = "weights/index.json"


def shipped_weights(name: str, **cfg: Any) -> PretrainedCfg | None:
    """The ``PretrainedCfg`` of weights shipped inside the package for ``name`` (from
    ``moezoo/zoo/weights/index.json``, written by ``moezoo zoo release``), or None."""
    index_file = resources.files("moezoo.zoo").joinpath(_WEIGHTS_INDEX)
    if not index_file.is_file():
        return None
    record = json.loads(index_file.read_text()).get(name)
    if record is None:
        return None
    return PretrainedCfg(source=f"package:weights/{record['file']}", sha256=record["sha256"], **cfg)


_REGISTRY: dict[str, ModelEntry] = {}
_UNAVAILABLE: dict[str, str] = {}  # modality -> why it could not register (a missing extra)
_loaded = False


def _ensure_loaded() -> None:
    """Import every ``moezoo.modalities.<modality>.zoo`` module once: they register the entries.

    The modalities are found by name (a plugin lookup, as entry points would be), so the registry
    depends on no modality's code. A modality whose optional dependencies are not installed
    registers nothing; :func:`get_entry` then names the extra to install."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pkgutil

    spec = importlib.util.find_spec("moezoo.modalities")
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        if info.ispkg and importlib.util.find_spec(f"moezoo.modalities.{info.name}.zoo") is not None:
            try:
                importlib.import_module(f"moezoo.modalities.{info.name}.zoo")
            except ImportError as err:
                if "moezoo[" not in str(err):  # only a missing extra is expected here
                    raise
                _UNAVAILABLE[info.name] = str(err)


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    modality: str,
    pretrained_cfg: PretrainedCfg | None = None,
    description: str = "",
    evaluate: str | None = None,
    card: dict[str, Any] | None = None,
    checkpoint_adapter: StateDictAdapter | None = None,
    **default_args: Any,
) -> ModelEntry:
    """Register ``name`` -> ``builder(**default_args)``; a second registration of a name raises."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name, builder, modality, dict(default_args), pretrained_cfg, description, evaluate,
                       dict(card or {}), checkpoint_adapter)
    _REGISTRY[name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a ``KeyError`` lists close names otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in _REGISTRY if name.split("_")[0] in n]
        missing = "".join(f"; the {m} modality is not installed ({why})" for m, why in sorted(_UNAVAILABLE.items()))
        raise KeyError(f"unknown model {name!r}; registered: {sorted(close or _REGISTRY)}{missing}") from None


def list_models(pattern: str = "*", pretrained: bool = False, modality: str | None = None) -> list[str]:
    """Sorted names matching the shell-style ``pattern``; ``pretrained=True`` keeps entries with weights."""
    _ensure_loaded()
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern)
        and (not pretrained or entry.pretrained_cfg is not None)
        and (modality is None or entry.modality == modality)
    )


CONFIG_NAME = "config.json"


def create_model(
    name: str | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with its pretrained weights or one's own checkpoint.

    Args:
        name: a name from :func:`list_models`; may be omitted when ``checkpoint_path`` is a folder
            written by :func:`export_model` (its ``config.json`` names the entry and arguments).
        pretrained: load the entry's published weights (checked against its sha256).
        checkpoint_path: load this instead: a safetensors file, an exported folder, or a
            ``moezoo fit`` ``.ckpt``.
        overrides: builder arguments replacing the entry's defaults.
    """
    if checkpoint_path is not None and (Path(checkpoint_path) / CONFIG_NAME).is_file():
        config = json.loads((Path(checkpoint_path) / CONFIG_NAME).read_text())
        if name is not None and name != config["entry"]:
            raise ValueError(f"{checkpoint_path} holds {config['entry']!r}, not {name!r}")
        name = config["entry"]
        overrides = {**config.get("args", {}), **overrides}
    if name is None:
        raise ValueError("create_model needs a model name (or checkpoint_path=<exported folder>)")
    entry = get_entry(name)
    model = entry.builder(**{**entry.default_args, **overrides})
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, entry=name, adapter=entry.checkpoint_adapter)
    elif pretrained:
        load_pretrained(model, name)
    if entry.pretrained_cfg is not None:
        model.pretrained_cfg = entry.pretrained_cfg
    model.moezoo_entry = name
    model.moezoo_args = dict(overrides)
    return model


def load_pretrained(model: nn.Module, name: str) -> nn.Module:
    """Load zoo entry ``name``'s published weights into ``model`` (fetched if needed, hash-checked,
    through the entry's checkpoint adapter), all-or-nothing."""
    entry = get_entry(name)
    cfg = entry.pretrained_cfg
    if cfg is None:
        raise CheckpointError(f"model {name!r} has no pretrained weights; see list_models(pretrained=True)")
    return load_checkpoint(model, cfg.resolve(), sha256=cfg.sha256, entry=name, adapter=entry.checkpoint_adapter)


def export_model(model: nn.Module, directory: str | os.PathLike, *, card: str | None = None) -> Path:
    """Write a zoo model as an HF-style folder: ``config.json`` (entry and arguments),
    ``model.safetensors`` and ``README.md`` (the model card), loadable with
    ``create_model(checkpoint_path=directory)``. The folder is assembled beside the target and
    renamed into place, so an interrupted export leaves no half-written folder.
    """
    name = getattr(model, "moezoo_entry", None)
    if name is None:
        raise ValueError("export_model needs a model made by create_model (it records the entry name)")
    args = getattr(model, "moezoo_args", {})
    try:
        config_text = json.dumps({"entry": name, "args": args, "moezoo_version": _version()}, indent=2)
    except TypeError as err:
        raise ValueError(f"export_model: the arguments of {name!r} are not JSON-serialisable ({err})") from err
    from moezoo.zoo.checkpoint import save_checkpoint

    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"export_model: {target} exists and is not empty")
    staging = target.parent / f".{target.name}.partial"
    # What an interrupted export left behind is ours to replace; the target itself is untouched.
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_checkpoint(model, staging / "model.safetensors", metadata={"entry": name})
        (staging / CONFIG_NAME).write_text(config_text + "\n")
        (staging / "README.md").write_text(card if card is not None else f"# {name}\n")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moezoo")
    except PackageNotFoundError:
        return "unknown"
