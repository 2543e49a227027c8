"""constraints.txt: the exact stack behind the published figures, consistent with pyproject's ranges."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def lock_module():
    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_lock_pins_every_dependency_within_pyprojects_ranges():
    pins = lock_module().read_lock()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}; regenerate it with python scripts/lock.py write"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"
        )
    for name in ("flwr", "torch", "transformers", "numpy", "scipy", "ray", "grpcio", "pyarrow"):
        assert name in pins, name
    assert "fedprime" not in pins and "pip" not in pins


def test_lock_check_reports_drift_and_strict_fails(tmp_path, capsys, monkeypatch):
    lock = lock_module()
    fake = tmp_path / "constraints.txt"
    fake.write_text("# comment\nflwr==0.0.1\n")
    monkeypatch.setattr(lock, "LOCK", fake)
    assert lock.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "flwr: locked 0.0.1, installed" in out
    assert lock.main(["check", "--strict"]) == 1


def test_lock_rejects_a_malformed_line(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("flwr>=1.0\n")
    with pytest.raises(ValueError, match="constraints.txt:1: expected 'name==version'"):
        lock_module().read_lock(bad)
