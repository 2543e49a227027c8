"""Runs that cannot learn stop and say why; nothing a crash leaves behind is wrong (issue 18).

Each test names the item of the issue it covers. The runs are the real ServerApp and
ClientApp on the in-process loopback grid (tests/loopback.py), the same code `flwr run`
executes (the real `flwr run` end-to-end tests, tests/test_e2e_*.py, run the same apps).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedprime_core.config import ConfigError, config_to_dict
from fedprime_core.data.records import DataError
from fedprime_core.failures import ClientOutcome, RunFailed, one_line, parse_reason, stop_reason
from fedprime_core.results import load_checkpoint, save_checkpoint
from fedprime_core.runlock import RunFolderBusy, RunLock
from server_app.app import main as server_main
from server_app.nodes import NotEnoughNodesError
from server_app.watchdog import SuperLinkWatchdog, superlink_address
from tests.loopback import LoopbackGrid, history, run_dir_of
from tests.loopback import run_server as run
from tests.processes import ROOT


@pytest.fixture()
def logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


# --- 1. the server validates what it can know before round 1 -----------------------------
def trained(grid: LoopbackGrid) -> list:
    return [m for m in grid.sent if m.metadata.message_type != "query"]


def test_a_malformed_missing_table_stops_the_run_before_round_1(quick_config, tmp_path, logs):
    table = tmp_path / "table.yaml"
    table.write_text(
        "# per-client mixtures\n0: {complete: 0.5, text-missing: abc, image-missing: 0.5}\ndefault: [1, 0, 0]\n"
    )
    cfg = quick_config(run_name="bad-table", missing_table=str(table))
    grid = LoopbackGrid(config_to_dict(cfg), 3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config_to_dict(cfg))
    with pytest.raises(DataError, match=r"entry 0 \(line 2\): 'text-missing' must be a number, got 'abc'"):
        server_main(grid, context)
    assert str(table) in logs.text and "FedPrime cannot start" in logs.text
    assert not trained(grid) and not run_dir_of(cfg).exists()  # nothing was sent, nothing left behind
    # A table that parses but lacks a partition the nodes have is caught the same way.
    table.write_text("0: [1, 0, 0]\n1: [0, 1, 0]\n")
    with pytest.raises(DataError, match="has no entry for client 2 and no 'default'"):
        run(cfg)


def test_data_too_small_for_every_partitions_minimum_stops_the_run_before_round_1(quick_config, logs):
    cfg = quick_config(run_name="too-small", max_train_samples=26, min_partition_size=10)
    grid = LoopbackGrid(config_to_dict(cfg), 3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config_to_dict(cfg))
    with pytest.raises(DataError, match="26 samples cannot give 3 clients at least 10 each"):
        server_main(grid, context)
    assert "split into 3 partitions (min-partition-size=10, max-train-samples=26)" in logs.text
    assert not trained(grid)
    run(quick_config(run_name="fits", max_train_samples=26, min_partition_size=8, num_server_rounds=1))


def test_a_missing_dataset_root_stops_the_run_before_round_1(quick_config, tmp_path, logs):
    cfg = quick_config(run_name="no-root", dataset="food101", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="dataset root .*nowhere' does not exist"):
        run(cfg)
    assert "FedPrime cannot start" in logs.text


def test_partitioned_nodes_that_disagree_on_their_count_are_refused(quick_config):
    configs = [{"partition-id": 0, "num-partitions": 3}, {"partition-id": 1, "num-partitions": 2}]
    with pytest.raises(ConfigError, match="disagree on num-partitions: 2 \\(nodes 2\\); 3 \\(nodes 1\\)"):
        run(quick_config(run_name="disagree"), num_nodes=2, node_configs=configs)


def test_too_few_nodes_stop_the_run_before_round_1_after_one_node_wait(quick_config, logs):
    cfg = quick_config(run_name="lonely", min_available_nodes=2, min_train_nodes=2, node_wait=1.0)
    started = time.monotonic()
    with pytest.raises(
        NotEnoughNodesError,
        match="only 1 node\\(s\\) connected after 1s \\(node-wait\\) before round 1; min-available-nodes is 2 "
        "and at least min-train-nodes = 2 are needed",
    ):
        run(cfg, num_nodes=1)
    assert time.monotonic() - started < 10  # one node-wait, not one for the check and another for round 1
    assert "FedPrime cannot start" in logs.text and not run_dir_of(cfg).exists()


# --- 2. fail fast -----------------------------------------------------------------------
def test_consecutive_skipped_rounds_stop_the_run_as_failed(quick_config, logs):
    cfg = quick_config(
        run_name="skips", fault_plan="0:crash,1:crash", num_server_rounds=6, max_skipped_rounds=2, fraction_evaluate=0.0
    )
    with pytest.raises(RunFailed, match="2 consecutive rounds were skipped"):
        run(cfg, num_nodes=2)
    records = history(cfg)
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["skipped"] for r in records[1:])
    _, meta = load_checkpoint(run_dir_of(cfg))
    assert meta["round"] == 2
    summary = json.loads((run_dir_of(cfg) / "summary.json").read_text())
    assert summary["status"] == "failed" and "max-skipped-rounds=2" in summary["reason"]
    assert "injected crash" in summary["reason"]
    assert "**Run failed after round 2:**" in (run_dir_of(cfg) / "summary.md").read_text()
    assert "FedPrime run FAILED" in logs.text and "FedPrime finished" not in logs.text
    assert not (run_dir_of(cfg) / "run.lock").exists()


def test_a_run_whose_clients_all_fail_with_a_config_error_ends_failed(quick_config, logs):
    # Partitioned nodes of a run whose config names no data-dir to carve shards from: an error
    # only training shows (the identity query of a partitioned node reads no data).
    cfg = quick_config(
        run_name="all-config", num_server_rounds=5, fraction_evaluate=0.0, dataset="food101", classes="a,b"
    )
    with pytest.raises(RunFailed, match="every sampled client \\(3\\) failed with a config or data error"):
        run(cfg, num_nodes=3)
    records = history(cfg)
    assert [r["round"] for r in records] == [1]  # stopped after the round that showed it
    assert records[0]["rejected"] == 3 and records[0]["accepted"] == 0
    summary = json.loads((run_dir_of(cfg) / "summary.json").read_text())
    assert summary["status"] == "failed" and "carves its shard out of the run config's data-dir" in summary["reason"]
    assert "FedPrime finished" not in logs.text


def test_sites_whose_node_config_is_wrong_are_refused_before_round_1(quick_config, logs):
    # Every site names a relative data-dir: a node-config error only the clients can see, found
    # by the identity query before round 1 (tests/test_site_checks.py: sites with bad data).
    configs = [{"data-dir": "site"} for _ in range(3)]
    cfg = quick_config(run_name="all-config", num_server_rounds=5, fraction_evaluate=0.0)
    with pytest.raises(RunFailed, match=r"3 site\(s\) refused before round 1 \(node-1: config error: .*absolute path"):
        run(cfg, num_nodes=3, node_configs=configs)
    summary = json.loads((run_dir_of(cfg) / "summary.json").read_text())
    assert summary["status"] == "failed" and "must be an absolute path" in summary["reason"]
    assert "FedPrime finished" not in logs.text


def test_the_skip_count_survives_a_resume_and_resets_after_a_good_round(quick_config):
    outcome = [ClientOutcome(1, "0", "rejected", "client error: InjectedFault: x")]
    assert stop_reason(outcome, skipped_in_a_row=1, max_skipped=2) is None
    assert "2 consecutive" in stop_reason(outcome, skipped_in_a_row=2, max_skipped=2)
    assert stop_reason(outcome, skipped_in_a_row=50, max_skipped=0) is None  # 0 never stops
    # The same transient error everywhere is not a reason to stop at once; a permanent one is.
    permanent = [ClientOutcome(n, str(n), "rejected", "client error: DataError: bad row", "data") for n in (1, 2)]
    assert "same data error: client error: DataError: bad row" in stop_reason(permanent, 1, 0)
    mixed = [permanent[0], ClientOutcome(3, "2", "timed-out", "no reply")]
    assert stop_reason(mixed, 1, 0) is None  # a silent client may still answer next round
    different = [permanent[0], ClientOutcome(2, "1", "rejected", "client error: ConfigError: y", "config")]
    assert "node 1 (client 1)" in stop_reason(different, 1, 0) and "node 2 (client 1)" in stop_reason(different, 1, 0)


# --- 3. every sampled client accounted for ------------------------------------------------
def test_timed_out_dead_and_crashed_clients_are_each_accounted_for(quick_config, logs):
    # Node 2 (client 1) never answers; node 3 (client 2) died: the SuperLink answers for it,
    # with its own node id (1) as the source; node 4 (client 3) crashes in round 2.
    cfg = quick_config(
        run_name="accounted",
        num_server_rounds=2,
        round_timeout=1.0,
        min_train_nodes=1,
        fault_plan="3:crash@2",
        fraction_evaluate=0.0,
        server_eval=False,
    )
    run(cfg, num_nodes=4, offline=[2], dead=[3])
    records = history(cfg)[-2:]
    for record in records:
        assert record["sampled"] == 4
        assert record["accepted"] + record["rejected"] + record["timed-out"] == 4
        assert record["timed-out"] == 1 and record["timed-out-nodes"][0].startswith("node 2:")
        assert "within round-timeout 1s" in record["timed-out-nodes"][0]
        dead = [r for r in record["rejected-reasons"] if "Node Unavailable" in r]
        assert len(dead) == 1 and dead[0].startswith("node 3"), record["rejected-reasons"]
        assert not any(r.startswith("node 1") for r in record["rejected-reasons"])  # not blamed on node 1
    round2 = records[1]
    assert round2["accepted"] == 1 and round2["rejected"] == 2
    crash = next(r for r in round2["rejected-reasons"] if "InjectedFault" in r)
    assert crash == "node 4 (client 3): client error: InjectedFault: injected crash on partition 3 in round 2"
    for reason in round2["rejected-reasons"] + round2["timed-out-nodes"]:
        assert "\n" not in reason and "\x1b" not in reason and "Traceback" not in reason
    csv = (run_dir_of(cfg) / "metrics.csv").read_text()
    assert "timed-out-nodes" in csv.splitlines()[0] and "within round-timeout" in csv
    assert "1 accepted, 2 rejected, 1 timed out" in logs.text
    assert "timed out: node 2" in logs.text
    assert "Traceback (most recent call last)" in logs.text  # the full traceback stays in the log


def test_reasons_from_flower_and_ray_become_one_line():
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
        '(pid=26188, ip=192.0.2.2)\n  File "/app/client_app/app.py", line 96, in train\n'
        "    new_state, metrics, usage = inject_fault(\n                                ^^^^^^^^^^^^^\n"
        "fedprime_core.tools.faults.InjectedFault: injected crash on partition 0 in round 1\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=26188)\n"
        '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
        "    raise ClientAppException(str(ex)) from ex\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: injected crash on partition 0 in round 1'>"
    )
    assert one_line(ray) == "InjectedFault: injected crash on partition 0 in round 1"
    assert parse_reason("<class 'ZeroDivisionError'>:<'division by zero'>") == (
        None,
        "ZeroDivisionError: division by zero",
    )
    assert parse_reason("[data] DataError: bad\nrow") == ("data", "DataError: bad row")
    assert len(one_line("x" * 5000)) == 500


# --- 4. atomic checkpoints ------------------------------------------------------------------
KILL_AT_STEP = """
import os, signal, sys
from pathlib import Path
import numpy as np
from fedprime_core import results

run_dir, kill_at = Path(sys.argv[1]), int(sys.argv[2])
count = 0

def step(function):
    def wrapped(*args, **kwargs):
        global count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # dies here, no clean-up of any kind
        return function(*args, **kwargs)
    return wrapped

for name in ("replace", "rename", "fsync", "unlink"):
    setattr(os, name, step(getattr(os, name)))
state = {"w": np.full(4, 2.0, np.float32), "b": np.full(2, 20.0, np.float32)}
results.save_checkpoint(run_dir, state, {"round": 2, "inter-pool": {"slots": {"0": [2, 2]}}, "state-keys": ["b", "w"]})
print(count)
"""


def save_round(run_dir: Path, server_round: int) -> None:
    state = {"w": np.full(4, float(server_round), np.float32), "b": np.full(2, 10.0 * server_round, np.float32)}
    meta = {"round": server_round, "inter-pool": {"slots": {"0": [server_round] * 2}}, "state-keys": ["b", "w"]}
    save_checkpoint(run_dir, state, meta)


def test_a_checkpoint_write_killed_at_any_step_resumes_from_one_whole_round(tmp_path):
    def kill_at(step: int, run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", KILL_AT_STEP, str(run_dir), str(step)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = tmp_path / "clean"
    save_round(clean, 1)
    done = kill_at(0, clean)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    assert steps >= 4
    seen = set()
    for step in range(1, steps + 1):
        run_dir = tmp_path / f"killed-{step}"
        save_round(run_dir, 1)
        died = kill_at(step, run_dir)
        assert died.returncode == -signal.SIGKILL, (step, died.stderr)
        state, meta = load_checkpoint(run_dir)  # what `resume` reads
        r = meta["round"]
        assert r in (1, 2)
        np.testing.assert_array_equal(state["w"], np.full(4, float(r)), err_msg=f"step {step}")
        np.testing.assert_array_equal(state["b"], np.full(2, 10.0 * r), err_msg=f"step {step}")
        assert meta["inter-pool"] == {"slots": {"0": [r, r]}}
        seen.add(r)
        save_round(run_dir, r + 1)  # the next save cleans up whatever the dead one left
        assert load_checkpoint(run_dir)[1]["round"] == r + 1
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(["checkpoint.json", f"checkpoint-{r + 1:06d}.npz"])
    assert seen == {1, 2}


def test_a_changed_array_file_is_refused(tmp_path):
    save_round(tmp_path, 3)
    save_round(tmp_path / "other", 4)
    (tmp_path / "checkpoint-000003.npz").write_bytes((tmp_path / "other" / "checkpoint-000004.npz").read_bytes())
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_checkpoint(tmp_path)


# --- 5. one writer per run folder -------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from fedprime_core.runlock import RunLock
RunLock(sys.argv[1], purpose="a ServerApp in another terminal").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_serverapp_on_a_locked_folder_is_refused_and_a_dead_owner_is_taken_over(quick_config, logs):
    cfg = quick_config(run_name="locked", num_server_rounds=1, fraction_evaluate=0.0, server_eval=False)
    folder = run_dir_of(cfg)
    holder = hold_lock(folder)
    try:
        with pytest.raises(RunFolderBusy) as refused:
            run(cfg, num_nodes=2)
        message = str(refused.value)
        assert f"process {holder.pid} on host {socket.gethostname()}" in message
        assert "a ServerApp in another terminal" in message and f"kill {holder.pid}" in message
        assert not (folder / "config.json").exists()  # the refused ServerApp wrote nothing
    finally:
        holder.kill()
        holder.wait()
    run(cfg, num_nodes=2)  # the owner died without a word: its lock is taken over
    assert f"took over the lock of process {holder.pid}" in logs.text
    assert [r["round"] for r in history(cfg)] == [1]
    assert not (folder / "run.lock").exists()


def test_the_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with RunLock(tmp_path, "first"):
        with pytest.raises(RunFolderBusy, match="first"):
            RunLock(tmp_path, "second").acquire()
    with RunLock(tmp_path, "third") as lock:
        assert lock.taken_over is None and json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_the_watchdog_notices_a_superlink_that_went_away():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    watchdog = SuperLinkWatchdog(address, timeout=1.0, interval=0.1, interrupt_after=None).start()
    try:
        time.sleep(1.5)
        assert not watchdog.lost.is_set()
        server.close()
        assert watchdog.lost.wait(10.0)
        assert address in watchdog.reason and "unreachable" in watchdog.reason
    finally:
        watchdog.stop()
        server.close()


def test_the_superlink_address_comes_from_the_grid_or_the_flower_process():
    class HttpLike:
        _addr = "10.0.0.5:8000"

    assert superlink_address(HttpLike(), argv=[]) == "10.0.0.5:8000"
    argv = ["flwr-simulation", "--runtime-api-address", "127.0.0.1:39091", "--insecure"]
    assert superlink_address(object(), argv=argv) == "127.0.0.1:39091"
    assert superlink_address(object(), argv=["pytest"]) is None


# --- 7. the small fixes -----------------------------------------------------------------------
def test_results_files_follow_the_umask(quick_config):
    cfg = quick_config(run_name="modes", num_server_rounds=1, fraction_evaluate=0.0)
    previous = os.umask(0o022)
    try:
        run(cfg, num_nodes=2)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir_of(cfg).iterdir()}
    assert "curves.png" in modes and "checkpoint-000001.npz" in modes
    assert modes == dict.fromkeys(modes, 0o644), modes


def test_a_refused_resume_shows_the_real_old_and_new_values(quick_config):
    cfg = quick_config(run_name="once", num_server_rounds=1, fraction_evaluate=0.0, server_eval=False)
    run(cfg, num_nodes=2)
    changed = quick_config(run_name="x", resume=str(run_dir_of(cfg)), **{"lambda": 0.02})
    with pytest.raises(ConfigError, match=r"'lambda' \(0\.01 -> 0\.02\)"):
        run(changed, num_nodes=2)
