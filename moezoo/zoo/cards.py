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

__all__ = ["REPO_ROOT", "card_path", "load_results", "render_card", "results_path", "write_card"]

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


def render_card(entry: ModelEntry, results: dict[str, Any], studies: list[dict[str, Any]]) -> str:
    """The Markdown card: YAML metadata (license, tags, datasets, model-index metrics) and body.

    Parameter counts are computed from the entry's architecture (they are not measurements); every
    other figure comes from the recorded results.
    """
    from moezoo.layers.routed import parameter_counts

    info = entry.card
    metrics = results["metrics"]
    counts = parameter_counts(entry.builder(**entry.default_args))
    lines = [
        "---",
        f"license: {info.get('license', 'apache-2.0')}",
        "library_name: moezoo",
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
        "",
        f"# {entry.name}",
        "",
        entry.description + ".",
        "",
        "## Architecture and routing",
        "",
        info.get("architecture", ""),
        "",
        f"Parameters: {counts['total']:,} in total, {counts['active']:,} active "
        "per token.",
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


def write_card(entry: ModelEntry, root: Path = REPO_ROOT) -> Path:
    """Render ``model_cards/<entry>.md`` from the recorded results."""
    results, studies = load_results(entry.name, root)
    path = card_path(entry.name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(entry, results, studies))
    return path
