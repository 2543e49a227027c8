"""The import structure of ``fedprime_core``: who imports whom, the cycles, and the arrows that run back up.

Every ``import`` counts, at the top of a module or inside a function (a lazy import still
ties the two modules together). A module belongs to a *part*: a subpackage (``method``,
``backbones``, ``data``, ``tools``) or a top-level module (``config``, ``runtime``, ...).
The parts sit in layers, from the bottom up (docs/architecture.md):

====================  ==============================================================
leaves                the small modules every part may use (``wire``, ``identity``,
                      ``metrics``, ``errors``, ``faultplan``, ...)
parts                 ``method``, ``backbones``, ``data``: each owns its vocabulary
schema                ``config``: assembles the one schema from the parts' vocabularies
run layer             ``runtime``, ``node``, ``site_worker``, ``run_settings``, ``results``, ...:
                      reads ``RunConfig`` and hands each part the plain values it needs
tools                 ``tools``: everything
====================  ==============================================================

An arrow from a lower layer to a higher one is an *upward* import; the parts never import
``config``. ``python -m fedprime_core.tools.imports`` prints the picture;
``tests/test_layers.py`` holds the package to it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "fedprime_core"
#: Subpackages that are one part each.
SUBPACKAGE_PARTS = ("method", "backbones", "data", "tools")
#: The parts that own vocabularies and never read the run configuration.
VOCABULARY_PARTS = ("method", "backbones", "data")
#: Layer of each part that is not a leaf (a leaf is layer 0).
LAYERS: dict[str, int] = {
    "method": 1,
    "backbones": 1,
    "data": 1,
    "config": 2,
    "runtime": 3,
    "site_worker": 3,
    "node": 3,
    "run_settings": 3,
    "results": 3,
    "runguard": 3,
    "failures": 3,
    "tools": 4,
}
LAYER_NAMES = ("leaves", "parts", "schema", "run layer", "tools")


def module_name(path: Path, root: Path) -> str:
    """``fedprime_core.data.loaders`` for ``root/fedprime_core/data/loaders.py`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names a module's imports reach: ``import a.b`` gives ``a.b``; ``from a import b`` gives
    ``a.b`` (a module, or a name defined in ``a``: :func:`module_imports` tells them apart)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def module_imports(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every module under ``root/package``."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        reached = _imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        targets = set()
        for name in reached:
            if not (name == package or name.startswith(package + ".")):
                continue
            # the longest prefix that is a module of the package: `from .x import f` -> x
            while name not in paths and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in paths and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def part_of(module: str, package: str = PACKAGE) -> str:
    """The part a module belongs to: its subpackage when that is a part, else its own top-level name."""
    rest = module[len(package) + 1 :].split(".") if module != package else ["__init__"]
    return rest[0]


def layer_of(part: str) -> int:
    return LAYERS.get(part, 0)


def part_graph(modules: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto parts (arrows inside a part dropped)."""
    graph: dict[str, set[str]] = {}
    for module, targets in modules.items():
        source = part_of(module)
        graph.setdefault(source, set()).update(part_of(t) for t in targets if part_of(t) != source)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (each sorted), sorted: every circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(nodes) + 100))

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return sorted(found)


def upward_imports(modules: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` module pairs whose part sits in a lower layer than the imported one's."""
    return sorted(
        (module, target)
        for module, targets in modules.items()
        for target in targets
        if layer_of(part_of(module)) < layer_of(part_of(target))
    )


def config_readers(modules: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs where a vocabulary part (method, backbones, data) imports ``config``."""
    return sorted(
        (module, target)
        for module, targets in modules.items()
        for target in targets
        if part_of(module) in VOCABULARY_PARTS and part_of(target) == "config"
    )


def report(root: Path) -> str:
    """The picture as text: module cycles, part cycles, upward imports, config readers."""
    modules = module_imports(root)
    lines = [f"{len(modules)} modules of {PACKAGE}"]
    for title, found in (("module cycles", cycles(modules)), ("part cycles", cycles(part_graph(modules)))):
        lines.append(f"{title}: {len(found)}")
        lines.extend("  " + " <-> ".join(component) for component in found)
    for title, pairs in (
        ("upward imports", upward_imports(modules)),
        ("vocabulary parts importing config", config_readers(modules)),
    ):
        lines.append(f"{title}: {len(pairs)}")
        lines.extend(
            f"  {a} ({LAYER_NAMES[layer_of(part_of(a))]}) -> {b} ({LAYER_NAMES[layer_of(part_of(b))]})"
            for a, b in pairs
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]))
