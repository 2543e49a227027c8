"""The test suite's own structure: test modules share helpers through helper modules and conftest."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def modules_imported_by(source: str) -> list[str]:
    """The ``tests.test_*`` modules that ``source`` imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[:2][-1].startswith("test_") and n.startswith("tests.")]
    return found


def test_no_test_module_imports_another():
    offenders = {
        path.name: modules_imported_by(path.read_text())
        for path in sorted(TESTS.glob("*.py"))
        if modules_imported_by(path.read_text())
    }
    assert offenders == {}, f"move the shared helpers to a helper module or a conftest fixture: {offenders}"


def test_the_check_sees_a_planted_cross_import_even_inside_a_function():
    planted = "def helper():\n    from tests.test_training import CLASSES\n    return CLASSES\n"
    assert modules_imported_by(planted) == ["tests.test_training", "tests.test_training.CLASSES"]
    assert modules_imported_by("from tests.loopback import run_server\nimport tests.layouts\n") == []
