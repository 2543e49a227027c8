"""A real deployment on this machine for the end-to-end tests: a SuperLink and SuperNodes as
separate processes, each started the way docs/deployment.md says, and the helpers that wait
for its rounds and read its results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.processes import ROOT, flower_env, free_port, run_checked, stop_marked

QUICK = "tau=8 kappa=2 max-train-samples=300 max-test-samples=100 fraction-evaluate=0.0"


class Federation:
    """A SuperLink and SuperNodes started with scripts/, on 127.0.0.1."""

    def __init__(self, tmp_path: Path, certs: Path | None = None, auth: bool = False, expose: bool = False) -> None:
        self.home = tmp_path / "flwr-home"
        self.home.mkdir()
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        # A fresh model cache, as on a new machine: the apps unpack the shipped tiny weights.
        self.env = flower_env(self.home, FEDPRIME_CACHE=str(tmp_path / "model-cache"))
        # The sites' address (the Fleet gate) and the operator's (the SuperLink on loopback);
        # with `expose` (Flower's own layout) the SuperLink serves everything on the sites' address.
        self.port = free_port()
        self.control = self.port if expose else free_port()
        self.certs = certs
        self.nodes: dict[int, subprocess.Popen] = {}
        args = ["--port", str(self.port), "--host", "127.0.0.1"]
        args += ["--expose-control-api"] if expose else ["--control-port", str(self.control)]
        if certs:
            args += ["--certs", str(certs)]
        if auth:
            args += ["--auth"]
        self.superlink = self._spawn("superlink", [str(ROOT / "scripts/start_superlink.sh"), *args])
        self.connect("fed", self.control)
        self._wait_for_superlink()

    def connect(self, name: str, port: int) -> None:
        """A connection ``name`` in this federation's FLWR_HOME to 127.0.0.1:``port`` (with the CA, if TLS)."""
        add = [str(ROOT / "scripts/add_connection.sh"), name, f"127.0.0.1:{port}"]
        run_checked(add + (["--ca", str(self.certs / "ca.crt")] if self.certs else []), self.env, timeout=30)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_for_superlink(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["flwr", "ls", "fed"], cwd=ROOT, env=self.env, capture_output=True, text=True)
            if out.returncode == 0:
                return
            assert self.superlink.poll() is None, (self.logs / "superlink.log").read_text()
            time.sleep(1)
        raise AssertionError("SuperLink did not come up:\n" + (self.logs / "superlink.log").read_text())

    def add_node(self, partition_id: int, num_partitions: int, key: Path | None = None) -> subprocess.Popen:
        cmd = [
            str(ROOT / "scripts/start_supernode.sh"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--partition-id",
            str(partition_id),
            "--num-partitions",
            str(num_partitions),
            "--port",
            str(free_port()),
        ]
        if self.certs:
            cmd += ["--ca", str(self.certs / "ca.crt")]
        if key:
            cmd += ["--key", str(key)]
        cmd += ["--", "--max-retries", "3", "--max-wait-time", "30"]
        self.nodes[partition_id] = self._spawn(f"supernode-{partition_id}", cmd)
        return self.nodes[partition_id]

    def add_site(self, client_id: str, data_dir: Path) -> subprocess.Popen:
        """A SuperNode that names its own data folder (site-local), not a partition."""
        cmd = [
            str(ROOT / "scripts/start_supernode.sh"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(data_dir),
            "--client-id",
            client_id,
            "--device",
            "cpu",
            "--port",
            str(free_port()),
            "--",
            "--max-retries",
            "3",
            "--max-wait-time",
            "30",
        ]
        node = self._spawn(f"supernode-{client_id}", cmd)
        self.nodes[len(self.nodes)] = node
        return node

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        """Until ``count`` SuperNodes are online at the SuperLink (``flwr supernode ls``): a test that means
        "these nodes are up" must not race their start-up on a loaded machine."""
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            cmd = ["flwr", "supernode", "ls", "fed", "--format", "json"]
            out = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
            try:
                nodes = json.loads(out.stdout).get("nodes", [])
            except (json.JSONDecodeError, AttributeError):
                nodes = []
            online = sum(1 for n in nodes if n.get("status") == "online")
            if online >= count:
                return
            time.sleep(1)
        raise AssertionError(f"{online} of {count} SuperNodes came online within {timeout:g}s")

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return run_checked(["flwr", *args], self.env, timeout=timeout)

    def run(self, overrides: str, timeout: float = 900) -> str:
        out = self.flwr("run", ".", "fed", "--stream", "--run-config", overrides, timeout=timeout)
        return out.stdout + out.stderr

    def stop(self) -> None:
        stop_marked(f"FLWR_HOME={self.home}")


def wait_for_round(run_dir: Path, round_number: int, timeout: float = 900) -> None:
    """Block until the run's checkpoint records ``round_number`` as completed."""
    deadline = time.monotonic() + timeout
    meta = run_dir / "checkpoint.json"
    while not (meta.exists() and json.loads(meta.read_text())["round"] >= round_number):
        assert time.monotonic() < deadline, f"round {round_number} did not complete within {timeout:.0f}s"
        time.sleep(1)


def records(results: Path, name: str) -> tuple[list[dict], dict]:
    folder = results / name
    return json.loads((folder / "metrics.json").read_text()), json.loads((folder / "clients.json").read_text())
