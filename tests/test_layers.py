"""The package's import graph runs one way: from the tools down to pure data, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distfd"

# Lower layers know nothing of higher ones. Modules not listed (CLI, service, calibration, quality,
# the embedded model) are tools on top and may import anything below.
LAYERS = {
    "validate": 0,
    "presets": 0,
    "schedule": 0,
    "runtime": 0,
    "adapters": 0,  # how models split: imports nothing of distfd outside adapters/
    "keysteps": 1,
    "config": 2,
    "consistency": 3,
    "engine": 4,
    "hooks": 5,
    "apply": 6,
}
TOP = max(LAYERS.values()) + 1


def _layer(module: str) -> int:
    head = module.removeprefix("distfd.").split(".")[0]
    return TOP if module == "distfd" else LAYERS.get(head, TOP)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = (
                    ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                )
                deps.add(target or "")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d == "distfd" or d.startswith("distfd.")} - {name}
    return graph


def test_no_import_runs_upward():
    graph = _graph()
    assert "distfd.engine" in graph and "distfd.adapters.unet" in graph
    upward = [
        f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
        for mod, deps in graph.items()
        for dep in deps
        if _layer(dep) > _layer(mod)
    ]
    assert not upward, "\n".join(upward)


def test_adapters_import_nothing_above_them():
    graph = _graph()
    for mod, deps in graph.items():
        if mod.startswith("distfd.adapters"):
            assert all(d.startswith("distfd.adapters") for d in deps), (mod, deps)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in graph.get(mod, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, mod, dep]))
            if dep not in state:
                visit(dep, [*path, mod])
        state[mod] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [])
