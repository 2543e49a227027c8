"""Every benchmark script runs end to end with its smallest settings and writes its JSON.

Not a timing test: the figures are not checked, only that each script works. The Flower
part of ``framework_overhead.py`` (a real ``flwr run``, about a minute) is left out here
(``--skip-flower``); ``tests/test_e2e_simulation.py`` covers ``flwr run`` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CASES = {
    "aggregation": [],
    "communication": [],
    "throughput": [],
    "framework_overhead": ["--skip-flower", "--skip-sequential"],
    "first_run": [],  # --quick: clone and read the README's command, install nothing
    "reply_fuzz": [],  # --quick: three hostile replies to fed-intra
    "deployment_rounds": ["--modes", "resident"],  # --quick: tiny-vilt, 2 sites, 2 rounds, a real deployment
    "server_memory": [],  # --quick: 4 and 20 synthetic clients, minimal profile
    "text_padding": [],  # --quick: embedded set, tiny-bert, one client's epoch per padding
    "feature_pass": [],  # --quick: 16 generated images through EfficientNet-Lite0, glibc's memory kept or not
}


# deployment_rounds starts a real SuperLink and SuperNodes.
STARTS_FLOWER = {"deployment_rounds"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.flower) if n in STARTS_FLOWER else n for n in sorted(CASES)]
)
def test_benchmark_runs_quick(name, tmp_path):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out), *CASES[name]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == name
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["torch"]


def test_pfpt_schedules_benchmark_runs_quick(tmp_path):
    out = tmp_path / "pfpt.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "aggregation.py"),
        "--quick",
        "--pfpt-only",
        "--pfpt-steps",
        "both",
    ]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (row,) = json.loads(out.read_text())["pfpt-rows"]
    assert row["per-client"]["adam-steps"] == 5 * row["per-sweep"]["adam-steps"]  # 5 clients


def test_alignment_regimes_benchmark_runs_quick(tmp_path):
    """--regimes writes its own file beside the path given (not over the main run's aggregation.json)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aggregation.py"), "--quick", "--regimes", "--threads", "one"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "aggregation.json")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert not (tmp_path / "aggregation.json").exists()
    payload = json.loads((tmp_path / "aggregation-regimes.json").read_text())
    assert payload["mode"] == "regimes" and {c["n"] for c in payload["results"]} == {10, 30}
    for child in payload["results"]:
        assert all(r.get("dense-equal", True) for r in child["regimes"].values())
