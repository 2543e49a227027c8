"""The real thing: `flwr run .` in simulation with 3 SuperNodes and 2 rounds."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.processes import flower_env, run_checked, stop_marked

pytestmark = pytest.mark.slow


def test_flwr_run_simulation_end_to_end(tmp_path, tiny_vilt):
    home = tmp_path / "flwr-home"
    home.mkdir()
    results = tmp_path / "results"
    # A machine that never made a tiny-vilt: the ServerApp, imported from the uploaded app
    # bundle, and the ClientApps must find the shipped weights and start without generating.
    env = flower_env(home, FEDPRIME_CACHE=str(tmp_path / "fresh-cache"))
    overrides = (
        f'num-server-rounds=2 results-dir="{results}" run-name="e2e" tau=8 kappa=2 '
        "max-train-samples=600 max-test-samples=200"
    )
    try:
        out = run_checked(
            [
                "flwr",
                "run",
                ".",
                "--stream",
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1",
                "--run-config",
                overrides,
            ],
            env,
            timeout=900,
        )
        run_id = re.search(r"Successfully started run (\d+)", out.stdout).group(1)
        stored = run_checked(["flwr", "log", run_id, "--show"], env, timeout=120)
    finally:
        stop_marked(f"FLWR_HOME={home}")
    log = out.stdout + out.stderr
    assert "FedPrime finished" in log, log[-3000:]
    # What the user reads: every client's line of every round, in the stream and in `flwr log`.
    for client in range(3):
        for server_round in (1, 2):
            line = re.compile(rf"client {client} \| round {server_round}: loss \d+\.\d+ on \d+ samples")
            assert line.search(log), log[-3000:]
            assert line.search(stored.stdout), stored.stdout[-3000:]
    assert re.search(r"client \d \| shard: \d+ train / \d+ validation samples", log)
    assert "tiny-vilt: unpacking the shipped weights" in log
    assert "generating tiny-vilt" not in log
    assert (results / "e2e" / "final.npz").is_file() and (results / "e2e" / "result.json").is_file()
    records = json.loads((results / "e2e" / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert record["accepted"] == 3 and record["rejected"] == 0
        assert record["inter-pool-size"] >= 2 and record["intra-pool-size"] == 8
        assert np.isfinite(record["train-loss"])
        assert all(np.isfinite(m["accuracy"]) for m in record["eval"].values())
    clients = json.loads((results / "e2e" / "clients.json").read_text())
    assert sorted(clients) == ["0", "1", "2"]
    assert (results / "e2e" / "curves.png").stat().st_size > 0
