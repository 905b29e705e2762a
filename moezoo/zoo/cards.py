"""Model cards generated from recorded evaluation JSON, so figures cannot drift from runs.

``model_cards/results/<entry>.json`` holds the entry's headline evaluation (written by
:func:`moezoo.zoo.release.release`); ``model_cards/results/<entry>.<study>.json`` files hold further
studies (e.g. a capacity sweep written by a benchmark). :func:`render_card` turns them, with the
entry's registry information, into ``model_cards/<entry>.md`` with an HF-style YAML header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moezoo.zoo.registry import ModelEntry

__all__ = ["PIPELINE_TAGS", "REPO_ROOT", "card_path", "load_results", "pipeline_tag", "render_card", "results_path", "write_card"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def card_path(name: str, root: Path = REPO_ROOT) -> Path:
    return root / "model_cards" / f"{name}.md"


def results_path(name: str, root: Path = REPO_ROOT) -> Path:
    return root / "model_cards" / "results" / f"{name}.json"


def load_results(name: str, root: Path = REPO_ROOT) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The headline results of ``name`` and its studies (sorted by file name)."""
    main = json.loads(results_path(name, root).read_text())
    studies = [json.loads(p.read_text()) for p in sorted(results_path(name, root).parent.glob(f"{name}.*.json"))]
    return main, studies


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


#: The hub's pipeline tag of an entry without a task of its own, by modality.
PIPELINE_TAGS = {
    "vision": "image-classification",
    "language_image": "zero-shot-image-classification",
    "text": "text-generation",
    "timeseries": "time-series-forecasting",
    "speech": "automatic-speech-recognition",
}


def pipeline_tag(entry: ModelEntry) -> str:
    """The card's ``pipeline_tag`` (the hub's task filter): the entry's task, else its modality's."""
    return entry.card.get("pipeline_tag") or entry.card.get("task") or PIPELINE_TAGS[entry.modality]


def render_card(entry: ModelEntry, results: dict[str, Any] | None, studies: list[dict[str, Any]]) -> str:
    """The Markdown card: YAML metadata (license, tags, datasets, model-index metrics) and body.

    Parameter counts are computed from the entry's architecture (they are not measurements); every
    other figure comes from the recorded results. An entry without recorded results (a paper-size
    architecture, or public weights not evaluated here) gets a card that says so, quoting the
    publisher's figures (``card["published"]``) as published.
    """
    if results is None:
        return _architecture_card(entry)
    info = entry.card
    metrics = results["metrics"]
    lines = [
        "---",
        f"license: {info.get('license', 'apache-2.0')}",
        "library_name: moezoo",
        f"pipeline_tag: {pipeline_tag(entry)}",
        "tags:",
        *[f"- {t}" for t in info.get("tags", [])],
        "datasets:",
        *[f"- {d}" for d in info.get("datasets", [])],
        "model-index:",
        f"- name: {entry.name}",
        "  results:",
        "  - task:",
        f"      type: {info.get('task', 'image-classification')}",
        "    dataset:",
        f"      name: {results['dataset']}",
        f"      type: {info.get('datasets', ['custom'])[0]}",
        f"      split: {results['split']}",
        "    metrics:",
    ]
    for key in info.get("card_metrics", list(metrics)):
        lines += [f"    - type: {key}", f"      value: {_fmt(metrics[key])}"]
    lines += [
        "---",
        *_heading(entry),
        info.get("architecture", ""),
        "",
        _parameters(entry),
        "",
        "## Training",
        "",
        f"Config: `{info.get('config', '-')}`. Trained with:",
        "",
        "```bash",
        results["commands"]["train"],
        "```",
        "",
        "## Results",
        "",
        f"On {results['dataset']} ({results['split']} split, {metrics.get('examples', '?')} examples); "
        "produced by:",
        "",
        "```bash",
        results["commands"]["evaluate"],
        "```",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()],
        "",
    ]
    for study in studies:
        lines += [f"### {study['title']}", "", study.get("summary", ""), "", "```bash", study["command"], "```", ""]
        columns = study["columns"]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in study["rows"]]
        lines.append("")
        if study.get("image"):
            lines += [f"![{study['title']}]({study['image']})", ""]
    lines += ["## Limitations", "", info.get("limitations", "Not stated."), ""]
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    try:
        return json.dumps(value)  # JSON scalars and lists are YAML
    except TypeError:
        return repr(value)


def _heading(entry: ModelEntry) -> list[str]:
    return ["", f"# {entry.name}", "", entry.description + ".", "", "## Architecture and routing", ""]


def _parameters(entry: ModelEntry) -> str:
    import torch

    from moezoo.layers.routed import parameter_counts

    with torch.device("meta"):  # shapes only: a 450M-parameter entry costs nothing to count
        counts = parameter_counts(entry.builder(**entry.default_args))
    return f"Parameters: {counts['total']:,} in total, {counts['active']:,} active per token."


def _architecture_card(entry: ModelEntry) -> str:
    info, cfg = entry.card, entry.pretrained_cfg
    if cfg is None:
        weights = "None ship with moezoo: `create_model` builds it with random initialisation."
    else:
        weights = f"`{cfg.source}` (public weights; `create_model(\"{entry.name}\", pretrained=True)` fetches them)."
    args = "\n".join(f"{k}: {_yaml_value(v)}" for k, v in sorted(entry.default_args.items()))
    lines = [
        "---",
        # moezoo's code is Apache-2.0; public weights carry their publisher's licence.
        f"license: {info.get('license', 'apache-2.0' if cfg is None else 'other')}",
        "library_name: moezoo",
        f"pipeline_tag: {pipeline_tag(entry)}",
        "tags:",
        *[f"- {t}" for t in info.get("tags", ["moezoo", "mixture-of-experts", entry.modality])],
        "---",
        *_heading(entry),
        *([info["architecture"], ""] if info.get("architecture") else []),
        f"Built by `{entry.builder.__module__}.{entry.builder.__qualname__}` with:",
        "",
        "```yaml",
        args,
        "```",
        "",
        _parameters(entry),
        "",
        "## Weights",
        "",
        weights,
        "",
        "## Results",
        "",
        "Not measured: moezoo has recorded no evaluation of this entry.",
        "",
        *(["### Published results", "", info["published"], ""] if info.get("published") else []),
        "## Limitations",
        "",
        info.get("limitations", "Not evaluated in this repository."),
        "",
    ]
    return "\n".join(lines)


def write_card(entry: ModelEntry, root: Path = REPO_ROOT) -> Path:
    """Render ``model_cards/<entry>.md`` from the recorded results (if any)."""
    recorded = results_path(entry.name, root).is_file()
    text = render_card(entry, *load_results(entry.name, root)) if recorded else render_card(entry, None, [])
    path = card_path(entry.name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
