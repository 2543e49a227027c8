"""The import structure of fedprime_core: the parts own their vocabularies and never read the run config,
no circle of imports, no import that runs back up a layer (fedprime_core.tools.imports draws the graph)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedprime_core.tools.imports import (
    config_readers,
    cycles,
    module_imports,
    part_graph,
    upward_imports,
)

ROOT = Path(__file__).resolve().parents[1]


def test_method_backbones_and_data_never_import_config():
    assert config_readers(module_imports(ROOT)) == []


def test_no_circle_of_imports_among_modules_or_parts():
    modules = module_imports(ROOT)
    assert cycles(modules) == []
    assert cycles(part_graph(modules)) == []


def test_no_import_runs_back_up_a_layer():
    assert upward_imports(module_imports(ROOT)) == []


def test_the_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    package = tmp_path / "fedprime_core"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("from .data import loaders\n")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "loaders.py").write_text("def f():\n    import fedprime_core.config\n")
    (package / "data" / "shards.py").write_text("def g():\n    from .. import config\n")
    modules = module_imports(tmp_path)
    assert modules["fedprime_core.data.loaders"] == {"fedprime_core.config"}
    assert modules["fedprime_core.data.shards"] == {"fedprime_core.config"}
    assert modules["fedprime_core.config"] == {"fedprime_core.data.loaders"}


def test_the_checks_catch_a_planted_import_of_config(tmp_path):
    """A copy of the package with one lazy import of config planted in data/: every check names it."""
    shutil.copytree(ROOT / "fedprime_core", tmp_path / "fedprime_core", ignore=shutil.ignore_patterns("*.json"))
    planted = tmp_path / "fedprime_core" / "data" / "planted.py"
    planted.write_text("def text_length(cfg):\n    from ..config import text_length\n\n    return text_length(cfg)\n")
    modules = module_imports(tmp_path)
    assert config_readers(modules) == [("fedprime_core.data.planted", "fedprime_core.config")]
    assert ("fedprime_core.data.planted", "fedprime_core.config") in upward_imports(modules)
    # config imports data (its datasets), so data -> config closes a circle of parts.
    assert ["config", "data"] == [part for part in cycles(part_graph(modules))[0] if part in ("config", "data")]
