"""The package's layers: every import (top-level or inside a function) points down the layer order, and no
group of modules imports itself in a circle. docs/DESIGN.md draws the same order.

The parser reads the source, so an import hidden in a function body counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medfed"

# Bottom first. A module may import its own layer's modules and any layer below, never one above.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"medfed", "medfed.exceptions", "medfed.constants", "medfed.files", "medfed.resources", "medfed.devices",
              "medfed._monai"}),
    ("config", {"medfed.config"}),
    ("models", {"medfed.models"}),
    ("data", {"medfed.data"}),
    ("selfsup", {"medfed.selfsup"}),
    ("privacy", {"medfed.privacy"}),
    ("task", {"medfed.task"}),
    ("fl", {"medfed.fl", "medfed.flower_patches", "medfed.strategies", "medfed.server", "medfed.client"}),
    ("experiment", {"medfed.experiment"}),
    ("apps", {"medfed.client_app", "medfed.server_app"}),
    ("launchers", {"medfed.simulations", "medfed.deploy"}),
    ("cli", {"medfed.cli"}),
]
# Below the fl layer nothing imports Flower: training, SSL, privacy and data are tested without it. The
# experiment layer drives the phases over Flower's Grid, and the apps and launchers are Flower's shape.
FLOWER_FREE = ("base", "config", "models", "data", "selfsup", "privacy", "task")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """Index of the layer owning ``module`` (the longest matching prefix wins: ``medfed`` is only the root)."""
    best, index = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    if index < 0:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/DESIGN.md")
    return index


def imports_of(module: str, path: Path | None = None) -> list[tuple[str, int]]:
    """Every medfed module ``module`` imports, with the line: absolute and relative, at any depth of the file."""
    path = path or MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in MODULES else base, node.lineno))
    return [(name, line) for name, line in found if name == "medfed" or name.startswith("medfed.")]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, _ in imports_of(module):
            while target not in MODULES:  # `import medfed.a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target != module:
                graph[module].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other (a cycle when a group has two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(sorted(group))

    for v in sorted(set(graph) | {w for targets in graph.values() for w in targets}):
        if v not in index:
            visit(v)
    return [g for g in groups if len(g) > 1]


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for module in sorted(MODULES):
        for target, line in imports_of(module):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} ({LAYERS[layer_of(module)][0]}) "
                             f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def room(module: str) -> str:
    """The top-level package (or module) of ``module``: ``medfed.privacy.ledger.chain`` -> ``medfed.privacy``."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_rooms() -> None:
    """Rooms (the top-level packages) that import each other are one room in disguise, even through different
    modules."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        for target in targets:
            if room(module) != room(target) and "medfed" not in (module, target):
                rooms[room(module)].add(room(target))
    cycles = strongly_connected(rooms)
    assert not cycles, "room cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", FLOWER_FREE)
def test_the_flower_free_layers_import_no_flower(layer: str) -> None:
    index = [name for name, _ in LAYERS].index(layer)
    flower = []
    for module, path in MODULES.items():
        if layer_of(module) != index:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            flower += [f"{module}:{node.lineno} {n}" for n in names if n == "flwr" or n.startswith("flwr.")]
    assert not flower, f"layer {layer} must not import Flower:\n" + "\n".join(flower)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: an import inside a function and a relative import are both found."""
    source = tmp_path / "algo.py"
    source.write_text("import torch\n\ndef f():\n    from medfed.cli import app\n    from .. import constants\n"
                      "    from .evaluation import TestSet\n")
    found = imports_of("medfed.task.algo", source)
    assert found == [("medfed.cli", 4), ("medfed.constants", 5), ("medfed.task.evaluation", 6)]
    assert layer_of("medfed.cli") > layer_of("medfed.task.algo")
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
