"""moezoo's imports run one way: routers, then kernels, then layers, then zoo/monitoring, then tasks,
then modalities, then the CLI; no module imports one above its layer, none takes part in a cycle,
and no modality imports another. Every ``import`` statement counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moezoo"

#: Layer of each module, by the longest matching prefix. Lower layers may not import higher ones.
LAYERS = {
    "moezoo.checks": 0,
    "moezoo.routers": 1,
    "moezoo.kernels": 2,
    "moezoo.layers": 3,
    "moezoo.zoo": 4,
    "moezoo.monitoring": 4,
    "moezoo.report": 4,
    "moezoo.resume": 5,
    "moezoo.data": 5,
    "moezoo.task": 5,
    "moezoo.distributed": 5,
    "moezoo.modalities": 6,
    "moezoo.lightning_cli": 7,
    "moezoo.cli": 7,
    "moezoo": 7,  # the package's public API imports from everywhere
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def modality(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "modalities" else None


def imports(path: Path, module: str) -> set[str]:
    """The moezoo modules ``path`` imports (a ``from package import name`` counts as the submodule
    when ``name`` is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moezoo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moezoo"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE.parent / Path(*sub.split("."))).is_dir() else node.module)
    return {m for m in found if m != module}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that run up the layering or from one modality into another."""
    found = []
    for module, targets in edges.items():
        for target in targets:
            if layer(target) > layer(module):
                found.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
            if modality(module) and modality(target) and modality(module) != modality(target):
                found.append(f"{module} imports another modality's {target}")
    return sorted(found)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, found by a depth-first walk. A package's ``__init__`` importing its own
    submodules is how Python loads them, not a dependency of them on the package: not an edge."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_no_import_runs_up_the_layering_or_across_modalities():
    assert not (found := violations(graph())), "\n".join(found)


def test_no_import_cycle():
    assert not (found := cycles(graph())), "\n".join(" -> ".join(c) for c in found)


def test_the_checks_find_planted_violations(tmp_path):
    source = tmp_path / "planted.py"
    source.write_text("from moezoo.layers import moe\ndef f():\n    from moezoo.cli import main\n")
    assert imports(source, "moezoo.routers.planted") == {"moezoo.layers.moe", "moezoo.cli"}
    planted = {"moezoo.routers.planted": {"moezoo.layers.moe"}, "moezoo.layers.moe": {"moezoo.routers.planted"},
               "moezoo.modalities.text.model": {"moezoo.modalities.vision.model"}}
    assert violations(planted) == [
        "moezoo.modalities.text.model imports another modality's moezoo.modalities.vision.model",
        "moezoo.routers.planted (layer 1) imports moezoo.layers.moe (layer 3)",
    ]
    assert cycles(planted) == [["moezoo.layers.moe", "moezoo.routers.planted", "moezoo.layers.moe"]]
