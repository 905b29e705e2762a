"""The model registry: ``register_model``, ``create_model``, ``list_models`` (timm-style)."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from moezoo.zoo.checkpoint import CheckpointError, StateDictAdapter, load_checkpoint

__all__ = [
    "ModelEntry",
    "PretrainedCfg",
    "ShippedEvaluation",
    "create_model",
    "download_url",
    "export_model",
    "get_entry",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "push_to_hub",
    "register_model",
    "register_shipped",
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

    def resolve(self, **hub_kwargs: Any) -> Path:
        """A local path to the weights, downloading (or reading the hub cache) when needed.

        ``hub_kwargs`` (``cache_dir``, ``revision``, ``token``, ``local_files_only``) apply to
        ``hf-hub`` sources (see :func:`moezoo.zoo.hub.hub_download`); ``cache_dir`` also to URLs.
        """
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
            return hub_download(repo, filename or None, allow_patterns=["*.json", "*.safetensors"], **hub_kwargs)
        return download_url(rest, url_cache_path(rest, hub_kwargs.get("cache_dir")), sha256=self.sha256)

    def source_fields(self) -> dict[str, str]:
        """The source as timm's ``pretrained_cfg`` names it: ``hf_hub_id``, ``url`` or ``file``."""
        kind, rest = self.source.split(":", 1)
        if kind == "hf-hub":
            return {"hf_hub_id": rest.partition(":")[0]}
        if kind == "url":
            return {"url": rest}
        return {"file": str(resources.files("moezoo.zoo").joinpath(rest)) if kind == "package" else rest}


def url_cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`download_url` keeps ``url``: ``<cache_dir>/<url key>/<file name>``, by default
    in ``<torch hub dir>/moezoo``.

    Keyed by the whole URL: two entries whose files share a name must not share a cache file.
    """
    from torch.hub import get_dir

    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = Path(get_dir()) / "moezoo" if cache_dir is None else Path(cache_dir)
    return root / url_key / Path(url).name


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
            weights) into the model's state-dict names, at load time.
        timm_cfg: timm's ``pretrained_cfg`` fields of the entry (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``first_conv``, ``classifier``, ...), given to every
            model :func:`create_model` builds as ``model.pretrained_cfg``.
        pretrained_filter: timm's ``pretrained_filter_fn``: ``filter(state, model) -> state`` adapts
            the published weights to a model built with other arguments (a new head, input channels
            or image size) as they are loaded.
        feature_wrapper: ``wrapper(model, **feature_kwargs) -> module`` for ``features_only=True``.
        hf_config: ``hf_config(model) -> dict``: the fields a folder written by :func:`export_model`
            carries in ``config.json`` beside moezoo's, for the ecosystem's readers (timm's hub
            config, a reference ``config.json``).
        hf_model_type: a foreign ``config.json``'s ``model_type`` this entry reads (with
            ``from_hf_config(config) -> builder arguments``), so that
            ``create_model(checkpoint_path=folder)`` loads folders other code wrote.
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
    timm_cfg: dict[str, Any] = field(default_factory=dict)
    pretrained_filter: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None
    feature_wrapper: Callable[..., nn.Module] | None = None
    hf_config: Callable[[nn.Module], dict[str, Any]] | None = None
    hf_model_type: str | None = None
    from_hf_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    def evaluator(self) -> Callable[[nn.Module], dict[str, float]]:
        if self.evaluate is None:
            raise ValueError(f"model {self.name!r} has no evaluation function")
        module, _, function = self.evaluate.partition(":")
        return getattr(importlib.import_module(module), function)

    def model_pretrained_cfg(self, overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` dict of this entry: where the weights are (``hf_hub_id``,
        ``url`` or ``file``), their license, and :attr:`timm_cfg`; then ``overlay``."""
        cfg: dict[str, Any] = {"architecture": self.name, "tag": None}
        if self.pretrained_cfg is not None:
            cfg.update(self.pretrained_cfg.source_fields(), license=self.pretrained_cfg.license)
        cfg.update(self.timm_cfg)
        cfg.update(overlay or {})
        return cfg


_WEIGHTS_INDEX = "weights/index.json"


def shipped_weights(name: str, **cfg: Any) -> PretrainedCfg | None:
    """The ``PretrainedCfg`` of weights shipped inside the package for ``name`` (from
    ``moezoo/zoo/weights/index.json``, written by ``moezoo zoo release``, with the card's headline
    metrics), or None."""
    index_file = resources.files("moezoo.zoo").joinpath(_WEIGHTS_INDEX)
    if not index_file.is_file():
        return None
    record = json.loads(index_file.read_text()).get(name)
    if record is None:
        return None
    return PretrainedCfg(source=f"package:weights/{record['file']}", sha256=record["sha256"],
                         metrics=dict(record.get("metrics", {})), **cfg)


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
    timm_cfg: dict[str, Any] | None = None,
    pretrained_filter: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None,
    feature_wrapper: Callable[..., nn.Module] | None = None,
    hf_config: Callable[[nn.Module], dict[str, Any]] | None = None,
    hf_model_type: str | None = None,
    from_hf_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    **default_args: Any,
) -> ModelEntry:
    """Register ``name`` -> ``builder(**default_args)`` (see :class:`ModelEntry`); a second
    registration of a name, or of a ``hf_model_type``, raises."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if (hf_model_type is None) != (from_hf_config is None):
        raise ValueError(f"model {name!r}: give hf_model_type and from_hf_config together")
    if hf_model_type is not None and any(e.hf_model_type == hf_model_type for e in _REGISTRY.values()):
        raise ValueError(f"model {name!r}: hf_model_type {hf_model_type!r} is already read by another entry")
    accepted = _accepted_arguments(builder)
    unknown = [] if accepted is None else sorted(set(default_args) - accepted)
    if unknown:
        raise ValueError(f"model {name!r}: {_builder_name(builder)} takes no arguments {unknown}")
    entry = ModelEntry(name, builder, modality, dict(default_args), pretrained_cfg, description, evaluate,
                       dict(card or {}), checkpoint_adapter, dict(timm_cfg or {}), pretrained_filter,
                       feature_wrapper, hf_config, hf_model_type, from_hf_config)
    _REGISTRY[name] = entry
    return entry


@dataclass(frozen=True)
class ShippedEvaluation:
    """How the card figures of a shipped entry are measured: ``evaluate`` ("module:function", see
    :class:`ModelEntry`) on ``split`` of the data named ``dataset_name`` (hub ids ``datasets``), for
    the hub's ``task``; ``card_metrics`` are the headline figures, the first the one ``zoo eval``
    compares."""

    evaluate: str
    dataset_name: str
    datasets: tuple[str, ...]
    split: str
    task: str
    card_metrics: tuple[str, ...]


def register_shipped(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    modality: str,
    input_spec: dict[str, Any],
    evaluation: ShippedEvaluation,
    tags: Sequence[str],
    architecture: str,
    limitations: str,
    license: str = "apache-2.0",
    register: Callable[..., ModelEntry] | None = None,
    **entry: Any,
) -> ModelEntry:
    """:func:`register_model` (or a modality's wrapper of it, ``register``) for an entry whose weights
    ship inside the package: its weights are :func:`shipped_weights` ``(name)``, its config
    ``configs/<modality>/<name>.yaml`` and its card ``model_cards/<name>.md`` (the paths
    ``moezoo zoo release`` and the card tests rely on), the card telling ``evaluation``, the hub
    ``tags`` (after "moezoo"), ``architecture`` and ``limitations``."""
    pretrained_cfg = shipped_weights(name, license=license, input_spec=input_spec, card=f"model_cards/{name}.md")
    card = {
        "config": f"configs/{modality}/{name}.yaml",
        "dataset_name": evaluation.dataset_name,
        "datasets": list(evaluation.datasets),
        "split": evaluation.split,
        "tags": ["moezoo", *tags],
        "task": evaluation.task,
        "card_metrics": list(evaluation.card_metrics),
        "architecture": architecture,
        "limitations": limitations,
    }
    return (register or register_model)(name, builder, modality=modality, pretrained_cfg=pretrained_cfg,
                                        evaluate=evaluation.evaluate, card=card, **entry)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a ``KeyError`` lists close names otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in _REGISTRY if name.split("_")[0] in n]
        missing = "".join(f"; the {m} modality is not installed ({why})" for m, why in sorted(_UNAVAILABLE.items()))
        raise KeyError(f"unknown model {name!r}; registered: {sorted(close or _REGISTRY)}{missing}") from None


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def list_models(filter: str | Sequence[str] = "", pretrained: bool = False,
                exclude_filters: str | Sequence[str] = "", modality: str | None = None) -> list[str]:
    """Sorted entry names, as ``timm.list_models``.

    Args:
        filter: shell-style pattern(s); a name matching any is kept ("" or "*": all).
        pretrained: keep only entries with published weights.
        exclude_filters: pattern(s) of names to leave out.
        modality: keep only this modality's entries.
    """
    _ensure_loaded()
    keep, drop = _patterns(filter) or ["*"], _patterns(exclude_filters)
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if any(fnmatch.fnmatch(name, p) for p in keep)
        and not any(fnmatch.fnmatch(name, p) for p in drop)
        and (not pretrained or entry.pretrained_cfg is not None)
        and (modality is None or entry.modality == modality)
    )


def list_pretrained(filter: str | Sequence[str] = "", exclude_filters: str | Sequence[str] = "") -> list[str]:
    """The entries with published weights (``timm.list_pretrained``)."""
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered entry (``timm.is_model``)."""
    _ensure_loaded()
    return name in _REGISTRY


def get_pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` dict of entry ``name`` (``timm.models.get_pretrained_cfg``)."""
    return get_entry(name).model_pretrained_cfg()


def _builder_name(builder: Callable[..., nn.Module]) -> str:
    return getattr(builder, "__qualname__", repr(builder))


def _accepted_arguments(builder: Callable[..., nn.Module]) -> set[str] | None:
    """The keyword arguments ``builder`` takes, following ``**kwargs`` up a class's bases (as
    ``VisionTransformerMoE`` hands them to timm's ``VisionTransformer``); None when it takes any."""
    if not inspect.isclass(builder):
        parameters = list(inspect.signature(builder).parameters.values())
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names: set[str] = set()
    for cls in builder.__mro__:
        if "__init__" not in cls.__dict__ or cls in (nn.Module, object):
            continue
        parameters = list(inspect.signature(cls.__dict__["__init__"]).parameters.values())
        names |= {p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


CONFIG_NAME = "config.json"
#: The keys of moezoo's own record in an exported ``config.json``.
MOEZOO_CONFIG_KEY = "moezoo"


def _folder_entry(folder: Path) -> tuple[str, dict[str, Any]]:
    """The entry and builder arguments recorded in a folder's ``config.json``: moezoo's record
    (``export_model``), timm's hub config (``architecture`` + ``model_args``, ``timm.models.save_for_hf``)
    or a foreign ``model_type`` an entry reads (e.g. ``TimeMoE.save_pretrained``'s)."""
    config_file = folder / CONFIG_NAME
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from err
    record = config.get(MOEZOO_CONFIG_KEY) or (config if "entry" in config else None)  # "entry": before 0.2
    if record is not None:
        return record["entry"], dict(record.get("args", {}))
    if "architecture" in config:
        return config["architecture"], dict(config.get("model_args", {}))
    model_type = config.get("model_type")
    _ensure_loaded()
    for entry in _REGISTRY.values():
        if model_type is not None and entry.hf_model_type == model_type:
            return entry.name, entry.from_hf_config(config)
    readers = sorted(e.hf_model_type for e in _REGISTRY.values() if e.hf_model_type)
    raise CheckpointError(
        f"{config_file} names no moezoo entry: no '{MOEZOO_CONFIG_KEY}' record, no timm 'architecture', and "
        f"model_type {model_type!r} is not one moezoo reads ({readers})"
    )


def create_model(
    name: str | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    pretrained_cfg: Mapping[str, Any] | str | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    features_only: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with its pretrained weights or one's own checkpoint,
    with timm's ``create_model`` conventions.

    Args:
        name: a name from :func:`list_models`; may be omitted when ``checkpoint_path`` is a folder
            whose ``config.json`` names the entry (see :func:`export_model`).
        pretrained: load the entry's published weights (checked against its sha256). With other
            ``num_classes``, ``in_chans`` or ``img_size`` than the entry's, its ``pretrained_filter``
            adapts them as timm does: a new, freshly initialised head, the stem summed or repeated
            over the channels, ``pos_embed`` resampled.
        checkpoint_path: load this instead (strictly, as saved): a safetensors file, a folder
            (``model.safetensors`` or a sharded ``model.safetensors.index.json``), or a
            ``moezoo fit`` ``.ckpt``.
        pretrained_cfg: timm's ``pretrained_cfg`` dict to use instead of the entry's (a tag name
            is refused: moezoo entries have one set of weights each).
        pretrained_cfg_overlay: fields replacing those of the ``pretrained_cfg``.
        cache_dir: download cache for hub and URL weights.
        features_only: return the entry's feature extractor (timm's ``features_only``; ``out_indices``
            and ``feature_cls`` go with it) instead of the classifier.
        overrides: builder arguments replacing the entry's defaults; one the builder does not take
            raises a ``TypeError`` listing those it takes.

    Returns:
        The model, with ``pretrained_cfg`` (timm's dict; ``default_cfg`` is the same dict),
        ``moezoo_cfg`` (the entry's :class:`PretrainedCfg`, or None), ``moezoo_entry`` and
        ``moezoo_args``.
    """
    if checkpoint_path is not None and (Path(checkpoint_path) / CONFIG_NAME).is_file():
        stored, args = _folder_entry(Path(checkpoint_path))
        if name is not None and name != stored:
            raise ValueError(f"{checkpoint_path} holds {stored!r}, not {name!r}")
        name = stored
        overrides = {**args, **overrides}
    if name is None:
        raise ValueError("create_model needs a model name (or checkpoint_path=<exported folder>)")
    entry = get_entry(name)
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        raise ValueError(f"create_model({name!r}): pretrained_cfg={pretrained_cfg!r} names a tag; moezoo entries have "
                         "no tags (pass a dict, or pretrained_cfg_overlay=)")
    feature_kwargs = {k: overrides.pop(k) for k in ("out_indices", "feature_cls") if k in overrides}
    if feature_kwargs and not features_only:
        raise ValueError(f"create_model({name!r}): {sorted(feature_kwargs)} go with features_only=True")
    if features_only and entry.feature_wrapper is None:
        raise ValueError(f"create_model({name!r}, features_only=True): the {entry.modality} entry {name!r} has no "
                         "feature extractor")
    accepted = _accepted_arguments(entry.builder)
    unknown = [] if accepted is None else sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(
            f"create_model({name!r}): {_builder_name(entry.builder)} takes no argument(s) "
            f"{', '.join(f'{k}={overrides[k]!r}' for k in unknown)}; it takes {sorted(accepted)}"
        )
    model = entry.builder(**{**entry.default_args, **overrides})
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, entry=name, adapter=entry.checkpoint_adapter)
    elif pretrained:
        load_pretrained(model, name, cache_dir=cache_dir)
    cfg = dict(pretrained_cfg) if isinstance(pretrained_cfg, Mapping) else entry.model_pretrained_cfg()
    cfg.update(pretrained_cfg_overlay or {})
    if features_only:
        model = entry.feature_wrapper(model, **feature_kwargs)
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg  # timm's alias
    model.moezoo_cfg = entry.pretrained_cfg
    model.moezoo_entry = name
    model.moezoo_args = dict(overrides)
    return model


def load_pretrained(model: nn.Module, name: str, *, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load zoo entry ``name``'s published weights into ``model`` (fetched if needed, into
    ``cache_dir`` when given, hash-checked, through the entry's checkpoint adapter and pretrained
    filter), all-or-nothing."""
    entry = get_entry(name)
    cfg = entry.pretrained_cfg
    if cfg is None:
        raise CheckpointError(f"model {name!r} has no pretrained weights; see list_models(pretrained=True)")
    hub_kwargs = {} if cache_dir is None else {"cache_dir": cache_dir}
    try:
        path = cfg.resolve(**hub_kwargs)
    except OSError as err:  # huggingface_hub's offline and not-found errors are OSErrors
        raise CheckpointError(f"weights of {name!r} ({cfg.source}) are not available: {err}") from err
    return load_checkpoint(model, path, sha256=cfg.sha256, entry=name, adapter=entry.checkpoint_adapter,
                           filter_fn=entry.pretrained_filter)


def export_model(model: nn.Module, directory: str | os.PathLike, *, card: str | None = None,
                 max_shard_size: int | str | None = None) -> Path:
    """Write a zoo model as a Hugging Face hub folder, loadable with ``create_model(checkpoint_path=directory)``:

    - ``config.json``: moezoo's record (``{"moezoo": {"entry", "args", "version"}}``) and the
      entry's ``hf_config`` fields (timm's hub config for vision entries, so that
      ``timm.create_model("local-dir:<folder>")`` reads it too; the reference ``config.json`` for
      Time-MoE, so that ``TimeMoE.from_pretrained`` does);
    - the weights, in the entry's foreign layout when it has a checkpoint adapter (Time-MoE's
      reference names), as ``model.safetensors`` or, past ``max_shard_size``, shards and
      ``model.safetensors.index.json``;
    - ``README.md``, the model card.

    The folder is assembled beside the target and renamed into place, so an interrupted export
    leaves no half-written folder.
    """
    name = getattr(model, "moezoo_entry", None)
    if name is None:
        raise ValueError("export_model needs a model made by create_model (it records the entry name)")
    entry = get_entry(name)
    args = getattr(model, "moezoo_args", {})
    config = {MOEZOO_CONFIG_KEY: {"entry": name, "args": args, "version": _version()}}
    if entry.hf_config is not None:
        config = {**entry.hf_config(model), **config}
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as err:
        raise ValueError(f"export_model: the arguments of {name!r} are not JSON-serialisable ({err})") from err
    from moezoo.zoo.checkpoint import save_checkpoint

    state = model.state_dict()
    if entry.checkpoint_adapter is not None:
        state = entry.checkpoint_adapter.to_foreign(state)
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"export_model: {target} exists and is not empty")
    staging = target.parent / f".{target.name}.partial"
    # What an interrupted export left behind is ours to replace; the target itself is untouched.
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_checkpoint(state, staging, metadata={"format": "pt", "entry": name}, max_shard_size=max_shard_size)
        (staging / CONFIG_NAME).write_text(config_text + "\n")
        (staging / "README.md").write_text(card if card is not None else f"# {name}\n")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def push_to_hub(model: nn.Module, repo_id: str, *, card: str | None = None, max_shard_size: int | str | None = None,
                **hub_kwargs: Any) -> str:
    """Export ``model`` (:func:`export_model`) into a temporary folder and upload it to the hub repo
    ``repo_id`` (created if needed) with :func:`moezoo.zoo.hub.upload_folder`; returns the commit URL."""
    import tempfile

    from moezoo.zoo.hub import upload_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model(model, Path(tmp) / "export", card=card, max_shard_size=max_shard_size)
        return upload_folder(folder, repo_id, **hub_kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moezoo")
    except PackageNotFoundError:
        return "unknown"
