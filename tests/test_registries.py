"""Adding a dataset or a backbone is one module and one registry entry (docs/architecture.md).

The last test does exactly that to a copy of the package: it writes a toy dataset module
and a toy backbone module, adds their registry entries, regenerates the configuration docs,
and checks that the schema, the loader, the backbone loader and the import rules all take
them, with no other file touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedprime_core.backbones import kinds
from fedprime_core.config import BACKBONES, DATASETS, DEFAULT_TEXT_LENGTHS, parse_run_config, text_length
from fedprime_core.data import datasets
from fedprime_core.data.datasets import DatasetSpec
from fedprime_core.data.loaders import load_dataset
from fedprime_core.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_the_schema_takes_its_datasets_and_backbones_from_the_registries():
    assert DATASETS == tuple(datasets.DATASETS) and BACKBONES == tuple(kinds.KINDS)
    assert DEFAULT_TEXT_LENGTHS == {name: spec.text_length for name, spec in datasets.DATASETS.items()}
    for name, spec in datasets.DATASETS.items():
        cfg = parse_run_config({"dataset": name, "data-dir": "" if spec.generated else "/data"})
        assert text_length(cfg) == spec.text_length
    assert datasets.headline_metric("mmimdb") == "macro_f1" and datasets.headline_metric("food101") == "accuracy"
    assert {name: kind.image_mode for name, kind in kinds.KINDS.items()} == {
        "vilt": "pixels",
        "text-encoder": "features",
    }


def _write_jsonl(root: Path, field: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("test", 3)):
        rows = [{"id": f"{split}{i}", "text": f"a text {i}", field: "odd" if i % 2 else "even"} for i in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_registered_dataset_is_read_with_its_own_facts(tmp_path, monkeypatch):
    toy = DatasetSpec(name="toy", text_length=17, metric="macro_f1", jsonl_label_fields=("kind",))
    root = tmp_path / "toy"
    _write_jsonl(root, "kind")
    with pytest.raises(DataError, match="unknown dataset 'toy'"):
        load_dataset("toy", root)
    monkeypatch.setitem(datasets.DATASETS, "toy", toy)
    data = load_dataset("toy", root)
    assert data.name == "toy" and data.text_max_length == 17 and data.headline_metric == "macro_f1"
    assert data.classes == ("even", "odd") and len(data.train) == 6 and not data.multilabel


TOY_DATASET = '''\
"""A toy dataset: short notes labelled by their kind (tests/test_registries.py)."""

from .spec import DatasetSpec

SPEC = DatasetSpec(name="toy", text_length=17, metric="macro_f1", jsonl_label_fields=("kind",))
'''
TOY_BACKBONE = '''\
"""A toy backbone family: ViLT's implementation under another name (tests/test_registries.py)."""

from .vilt import load, resolve_source

__all__ = ["load", "resolve_source"]
'''
TOY_KIND = """\
        BackboneKind(
            "toy-vilt",
            "pixels",
            "fedprime_core.backbones.toy",
            generated={TINY_VILT: "fedprime_core.backbones.tiny:ensure_tiny_vilt"},
        ),
"""
CHECK = """\
import json, sys
from pathlib import Path
from fedprime_core.backbones import image_mode, load_backbone
from fedprime_core.config import BACKBONES, DATASETS, parse_run_config, text_length
from fedprime_core.data.loaders import load_dataset
from fedprime_core.tools.imports import config_readers, cycles, module_imports, part_graph, upward_imports

cfg = parse_run_config({"dataset": "toy", "data-dir": sys.argv[1], "backbone": "toy-vilt", "model": "some/hub-id"})
data = load_dataset("toy", sys.argv[1])
toy, vilt = (load_backbone(kind, "tiny-vilt", text_max_length=8) for kind in ("toy-vilt", "vilt"))
modules = module_imports(Path("."))
print(json.dumps({
    "datasets": DATASETS, "backbones": BACKBONES, "text-length": text_length(cfg),
    "metric": data.headline_metric, "classes": data.classes, "image-mode": image_mode("toy-vilt"),
    "same-weights": toy.fingerprint == vilt.fingerprint,
    "import-problems": [config_readers(modules), cycles(modules), cycles(part_graph(modules)), upward_imports(modules)],
}))
"""


def _add_line(path: Path, anchor: str, line: str) -> None:
    """Put ``line`` after the one occurrence of ``anchor`` in ``path``."""
    text = path.read_text()
    assert text.count(anchor) == 1, anchor
    path.write_text(text.replace(anchor, anchor + line))


@pytest.mark.slow
def test_a_toy_dataset_and_backbone_are_one_module_and_one_registry_entry_each(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "fedprime_core", copy / "fedprime_core", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "docs/configuration.md", "scripts/sync_config_docs.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, copy / name)
    package = copy / "fedprime_core"
    # The dataset: its module, its entry in the registry.
    (package / "data" / "datasets" / "toy.py").write_text(TOY_DATASET)
    registry = package / "data" / "datasets" / "__init__.py"
    _add_line(registry, "from . import embedded, fashion, food101, mmimdb", ", toy")
    _add_line(registry, "        fashion.SPEC,\n", "        toy.SPEC,\n")
    # The backbone: its module, its entry in the registry.
    (package / "backbones" / "toy.py").write_text(TOY_BACKBONE)
    _add_line(package / "backbones" / "kinds.py", "    for kind in (\n", TOY_KIND)
    # The docs, regenerated.
    env = {**os.environ, "PYTHONPATH": str(copy)}
    subprocess.run([sys.executable, "scripts/sync_config_docs.py"], cwd=copy, env=env, check=True, capture_output=True)
    docs = (copy / "docs" / "configuration.md").read_text()
    assert "`fashion`, `toy`" in docs and "32 fashion, 17 toy" in docs and "`toy-vilt`" in docs

    root = tmp_path / "toy-data"
    _write_jsonl(root, "kind")
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(root)], cwd=copy, env=env, check=True, capture_output=True, text=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["datasets"][-1] == "toy" and got["backbones"][0] == "toy-vilt"
    assert got["text-length"] == 17 and got["metric"] == "macro_f1" and got["classes"] == ["even", "odd"]
    assert got["image-mode"] == "pixels" and got["same-weights"]
    assert got["import-problems"] == [[], [], [], []]
    changed = textwrap.dedent(
        """\
        fedprime_core/backbones/kinds.py
        fedprime_core/backbones/toy.py
        fedprime_core/data/datasets/__init__.py
        fedprime_core/data/datasets/toy.py
        """
    )
    differs = sorted(
        str(path.relative_to(copy))
        for path in package.rglob("*.py")
        if not (ROOT / path.relative_to(copy)).is_file()
        or (ROOT / path.relative_to(copy)).read_bytes() != path.read_bytes()
    )
    assert "\n".join(differs) + "\n" == changed
