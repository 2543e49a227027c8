"""The test command's scheduling: tests that start Flower processes run one at a time.

``pytest -n 2 --dist loadgroup`` (the README's test command) keeps the tests marked ``flower``
on one worker only if pytest-xdist's grouping works with the installed pytest; with pytest 9.2 it
silently does not (pytest-dev/pytest-xdist#1386), and the suite then runs two federations at
once on two cores. This runs the real hook (``tests/groups.py``, used by ``tests/conftest.py``)
under xdist on a small module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULE = """\
import time

import pytest


@pytest.mark.flower
@pytest.mark.parametrize("i", range(4))
def test_starts_flower(i):
    time.sleep(0.3)


@pytest.mark.parametrize("i", range(4))
def test_in_process(i):
    time.sleep(0.3)
"""


def test_tests_marked_flower_share_one_worker_under_the_test_command(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.groups import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_grouped.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED test_grouped\.py::(\w+)\[\d\](@\w+)?", done.stdout)
    assert len(ran) == 8, done.stdout[-3000:]
    flower = [(worker, group) for worker, name, group in ran if name == "test_starts_flower"]
    assert {group for _, group in flower} == {"@flower"}, done.stdout[-3000:]
    assert len({worker for worker, _ in flower}) == 1, done.stdout[-3000:]
    assert all(group == "" for _, name, group in ran if name == "test_in_process")
