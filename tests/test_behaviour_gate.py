"""The fixed-seed behaviour gate (scripts/behaviour_gate.py) finds what changed and nothing else."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "behaviour_gate.py"


@pytest.fixture(scope="module")
def gate():
    spec = importlib.util.spec_from_file_location("behaviour_gate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, metrics: list, clients: list, state: dict[str, np.ndarray]) -> Path:
    run = root / "gate"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "clients.json").write_text(json.dumps(clients))
    np.savez(run / "final.npz", **state)
    return root


def base_run():
    metrics = [
        {
            "round": 1,
            "train-loss": 1.25,
            "inter-align-objective": 5094.90869140625,
            "accepted": 4,
            "bytes-sent": 1000,
            "round-seconds": 3.0,
            "eval": {"val": {"accuracy": 0.5, "loss": 0.9}},
        }
    ]
    clients = [{"client": "0", "node-id": 17, "num-train": 60}]
    state = {"head": np.arange(6, dtype=np.float32).reshape(2, 3)}
    return metrics, clients, state


def test_same_run_passes_and_ignores_timings_node_ids_and_float_noise(gate, tmp_path, capsys):
    metrics, clients, state = base_run()
    before = write_run(tmp_path / "before", metrics, clients, state)
    metrics[0]["round-seconds"] = 9.0
    metrics[0]["train-loss"] = 1.25 * (1 + 1e-6)
    metrics[0]["inter-align-objective"] = 5094.908203125
    clients[0]["node-id"] = 99
    state = {"head": state["head"] + np.float32(1e-8)}
    after = write_run(tmp_path / "after", metrics, clients, state)
    assert gate.compare(before, after) == 0
    assert "gate: same behaviour" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change",
    ["accuracy", "count", "bytes", "loss", "state", "new-key", "array-shape"],
)
def test_each_kind_of_change_is_reported(gate, tmp_path, capsys, change):
    metrics, clients, state = base_run()
    before = write_run(tmp_path / "before", metrics, clients, state)
    if change == "accuracy":
        metrics[0]["eval"]["val"]["accuracy"] = 0.5 + 1e-12
    elif change == "count":
        clients[0]["num-train"] = 61
    elif change == "bytes":
        metrics[0]["bytes-sent"] = 1001
    elif change == "loss":
        metrics[0]["train-loss"] = 1.26
    elif change == "state":
        state = {"head": state["head"] + np.float32(1e-3)}
    elif change == "new-key":
        metrics[0]["inter-pool-size"] = 3
    else:
        state = {"head": state["head"].reshape(3, 2)}
    after = write_run(tmp_path / "after", metrics, clients, state)
    assert gate.compare(before, after) == 1
    assert "gate: 1 difference(s)" in capsys.readouterr().out
