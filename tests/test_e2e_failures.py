"""A killed SuperLink or ServerApp, with real Flower processes: the run ends with an honest status.

For each: ``flwr run --stream`` returns, summary.json says ``failed`` and why, ``run.lock`` is
gone, and no process of the run is left (the ServerApp, its guard, Ray's processes in
simulation, DashboardAgent and RuntimeEnvAgent included). Processes are found by the
test's private FLWR_HOME in their environment (every process of the run inherits it).
In simulation every listener of the run is on 127.0.0.1 (Ray included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.deployment import QUICK, Federation, wait_for_round
from tests.processes import ROOT, flower_env, marked_pids, stop_marked

pytestmark = [pytest.mark.slow, pytest.mark.flower]

# Enough rounds that the run cannot finish before a kill takes effect (a round of this size takes
# 1-2 s; with 4 rounds a run could end while the watchdog's superlink-timeout was still counting,
# and its summary then rightly said "finished"). A kill ends the run long before round 40.
SMALL = f"num-server-rounds=40 {QUICK} server-eval=false superlink-timeout=5.0"


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def listeners(pids: list[int]) -> dict[str, str]:
    """``address -> command`` of every TCP socket the processes ``pids`` listen on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        for pid in pids:
            if f"pid={pid}," in line:
                found[line.split()[3]] = command(pid)[:80]
    return found


def left_over(marker: str, keep: tuple[str, ...], timeout: float) -> list[str]:
    """Processes carrying ``marker`` whose command names none of ``keep``, once ``timeout`` has passed
    or as soon as there are none."""
    deadline = time.monotonic() + timeout
    while True:
        left = [command(p) for p in marked_pids(marker)]
        left = [c for c in left if c and not any(k in c for k in keep)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(2)


def finished_failed(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert not (run_dir / "run.lock").exists()
    return summary


def kill(marker: str, name: str) -> list[int]:
    targets = [p for p in marked_pids(marker) if name in command(p)]
    assert targets, f"no {name} process"
    for pid in targets:
        os.kill(pid, signal.SIGKILL)
    return targets


class Simulation:
    """``flwr run --stream`` of a small simulation, in the background, until its round 1 is saved."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "flwr-home"
        self.home.mkdir()
        self.results = tmp_path / "results"
        self.env = flower_env(self.home)
        self.marker = f"FLWR_HOME={self.home}"
        self.log = tmp_path / "stream.log"
        for _ in range(3):  # flwr gives its local SuperLink 15 s to start; a loaded machine may need more
            self.run = self._start()
            if self._round_1_or_exit():
                return
            if "Failed to start local SuperLink" not in self.log.read_text():
                break
            time.sleep(5)
        raise AssertionError("the run did not reach round 1:\n" + self.log.read_text()[-3000:])

    def _start(self) -> subprocess.Popen:
        with open(self.log, "w") as stream:
            return subprocess.Popen(
                [
                    "flwr",
                    "run",
                    ".",
                    "--stream",
                    "--federation-config",
                    "num-supernodes=2 client-resources-num-cpus=1",
                    "--run-config",
                    f'results-dir="{self.results}" run-name="k" {SMALL}',
                ],
                cwd=ROOT,
                env=self.env,
                stdout=stream,
                stderr=subprocess.STDOUT,
            )

    def _round_1_or_exit(self, timeout: float = 900) -> bool:
        meta = self.results / "k" / "checkpoint.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if meta.exists() and json.loads(meta.read_text())["round"] >= 1:
                return True
            if self.run.poll() is not None:
                return False
            time.sleep(1)
        return False

    def stop(self) -> None:
        stop_marked(self.marker)


def test_simulation_superlink_killed(tmp_path, tiny_vilt):
    sim = Simulation(tmp_path)
    try:
        listening = listeners(marked_pids(sim.marker))
        kill(sim.marker, "flower-superlink")
        sim.run.wait(timeout=300)  # flwr run --stream returns
        left = left_over(sim.marker, keep=(), timeout=180)
    finally:
        sim.stop()
    assert listening and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in listening), listening
    assert any("raylet" in c or "gcs_server" in c for c in listening.values()), listening  # Ray's, on loopback too
    assert left == [], left
    reason = finished_failed(sim.results / "k")["reason"]
    assert ("SuperLink" in reason and "unreachable" in reason) or "is gone" in reason, reason


def test_simulation_serverapp_killed(tmp_path, tiny_vilt):
    sim = Simulation(tmp_path)
    try:
        kill(sim.marker, "flwr-simulation")
        sim.run.wait(timeout=300)  # flwr run --stream returns
        # The local SuperLink (and its SuperExec) outlive every run by design; nothing else may.
        left = left_over(sim.marker, keep=("flower-superlink", "flower-superexec"), timeout=120)
    finally:
        sim.stop()
    assert left == [], left
    reason = finished_failed(sim.results / "k")["reason"]
    assert "ended without finishing after round" in reason and "resume with resume=" in reason


def _deployment_run(tmp_path: Path) -> tuple[Federation, subprocess.Popen, Path]:
    fed = Federation(tmp_path)
    fed.add_node(0, 2)
    fed.add_node(1, 2)
    results = tmp_path / "results"
    stream = open(tmp_path / "stream.log", "w")  # noqa: SIM115 - the process owns it
    run = subprocess.Popen(
        ["flwr", "run", ".", "fed", "--stream", "--run-config", f'results-dir="{results}" run-name="k" {SMALL}'],
        cwd=ROOT,
        env=fed.env,
        stdout=stream,
        stderr=subprocess.STDOUT,
    )
    wait_for_round(results / "k", 1)
    return fed, run, results / "k"


def test_deployment_superlink_killed(tmp_path, tiny_vilt):
    fed, run, run_dir = _deployment_run(tmp_path)
    try:
        kill(f"FLWR_HOME={fed.home}", "flower-superlink")
        run.wait(timeout=300)  # flwr run --stream returns
        # The sites stay up and wait for their SuperLink to come back: each SuperNode, its
        # executor and its resident site worker (which lives as long as its SuperNode).
        site = ("supernode", "superexec", "flwr-clientapp", "fedprime_core.site_worker")
        left = left_over(f"FLWR_HOME={fed.home}", keep=site, timeout=180)
        workers = [p for p in marked_pids(f"FLWR_HOME={fed.home}") if "site_worker" in command(p)]
    finally:
        fed.stop()
    assert left == [], left  # the ServerApp, its guard, the gate and the start script are gone
    assert workers, "each site's resident worker outlives its SuperLink, as its SuperNode does"
    # ... and goes with its SuperNode: nothing of the federation is left once the sites stop.
    assert left_over(f"FLWR_HOME={fed.home}", keep=(), timeout=60) == []
    reason = finished_failed(run_dir)["reason"]
    assert "ended without finishing after round" in reason or "unreachable" in reason, reason


def test_deployment_serverapp_killed_and_flwr_run_stream_returns(tmp_path, tiny_vilt):
    fed, run, run_dir = _deployment_run(tmp_path)
    try:
        kill(f"FLWR_HOME={fed.home}", "flwr-serverapp")
        run.wait(timeout=300)  # returns: Flower marks the run finished when its heartbeat stops
        left = [c for c in (command(p) for p in marked_pids(f"FLWR_HOME={fed.home}")) if "runguard" in c]
    finally:
        fed.stop()
    assert left == []
    reason = finished_failed(run_dir)["reason"]
    assert "it was killed" in reason and f"resume with resume='{run_dir}'" in reason
