"""The documentation: a README read in minutes, its links alive, and the site building in strict mode."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "pip install torch==2.13.0" in blocks[0] and "flwr run ." in blocks[0]
    test_command = blocks[1].strip().split("&&")[-1].strip()
    assert test_command.startswith("python -m pytest -q")
    # CI runs the README's test command, as it is written.
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [line for line in lines if "pytest" in line and not line.startswith("#")]
    assert len(ci) == 1 and (ci[0].startswith(test_command + " ") or ci[0] == test_command), ci


def test_every_local_link_of_the_readme_names_a_file_that_exists():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if not t.startswith(("http", "#"))]
    assert targets, "the README links its documentation"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="pip install -e '.[docs]' (CI installs it)")
def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link, a missing anchor, a page outside the nav or a docstring mkdocstrings cannot read fails."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "findings" / "index.html").is_file()


def test_every_command_the_readme_shows_parses_and_uses_flags_flower_knows():
    """Each bash block passes `bash -n`, and every `flwr run` flag it uses is one the installed flwr has."""
    import shutil

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, f"{done.stderr}\n{block}"
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    help_text = subprocess.run([flwr, "run", "--help"], capture_output=True, text=True, timeout=120).stdout
    used = set(re.findall(r"flwr run \. [^`\n]*?(--[a-z-]+)", text)) | set(re.findall(r"(--[a-z-]+-config)\b", text))
    assert {"--stream", "--run-config", "--federation-config"} <= used | {"--stream"}
    unknown = [flag for flag in sorted(used) if flag not in help_text]
    assert not unknown, f"flwr run has no {unknown}"
