"""Every failure ends with an honest status: summary.json says ``failed`` and why, the lock is let go.

The runs are the real ServerApp and ClientApp on the in-process loopback grid
(tests/loopback.py). A results folder that cannot be written is made by the file system
where the test can do that without touching the machine (a regular file in the way; a
full or read-only tmpfs mounted in a private mount namespace, ``unshare``), and by an
``OSError`` injected at the one write boundary (``fedprime_core.atomic``) where not.
The killed-process cases with real Flower processes are in tests/test_e2e_failures.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedprime_core import atomic
from fedprime_core.config import config_to_dict
from fedprime_core.failures import RunFailed
from fedprime_core.results import load_checkpoint
from fedprime_core.runguard import RunGuard
from fedprime_core.runlock import RunLock
from tests.loopback import history, run_dir_of
from tests.loopback import run_server as run
from tests.processes import ROOT


@pytest.fixture()
def logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def summary(cfg) -> dict:
    return json.loads((run_dir_of(cfg) / "summary.json").read_text())


def test_a_results_dir_under_a_regular_file_cannot_start_and_says_why(quick_config, tmp_path, logs):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    cfg = quick_config(results_dir=str(blocker / "results"), run_name="r", num_server_rounds=1)
    with pytest.raises(OSError):
        run(cfg, num_nodes=2)
    line = next(r.getMessage() for r in logs.records if "FedPrime cannot start" in r.getMessage())
    assert f"the run folder {blocker / 'results' / 'r'} cannot be created or written: Not a directory" in line
    assert "set results-dir to a folder this ServerApp can write" in line
    assert blocker.read_text().startswith("a file")  # nothing replaced it


def _fail_writes(monkeypatch, predicate, code=errno.ENOSPC):
    """Every atomic write whose path ``predicate`` accepts fails as a full disk would."""
    real = atomic.atomic_write

    def write(path, writer, durable=False):
        if predicate(Path(path)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, writer, durable)

    monkeypatch.setattr("fedprime_core.atomic.atomic_write", write)
    monkeypatch.setattr("fedprime_core.results.atomic_write", write)


def test_a_full_disk_while_writing_a_checkpoint_fails_the_run_honestly_and_resume_repairs_it(
    quick_config, monkeypatch, logs
):
    cfg = quick_config(run_name="full", num_server_rounds=2, fraction_evaluate=0.0)
    folder = run_dir_of(cfg)

    def full_from_round_2(path: Path) -> bool:
        return path.name.startswith("checkpoint-") and path.name >= "checkpoint-000002"

    _fail_writes(monkeypatch, full_from_round_2)
    with pytest.raises(RunFailed, match="No space left on device"):
        run(cfg, num_nodes=2)
    status = summary(cfg)
    assert status["status"] == "failed"
    assert "cannot write the results of round 2" in status["reason"] and "No space left on device" in status["reason"]
    assert "checkpoint-000002.npz" in status["reason"]
    assert "**Run failed after round 1:**" in (folder / "summary.md").read_text()
    assert [r["round"] for r in history(cfg)] == [0, 1]  # what the checkpoint holds, nothing more
    assert load_checkpoint(folder)[1]["round"] == 1
    assert not (folder / "run.lock").exists()
    assert "FedPrime run FAILED after round 1: cannot write the results of round 2" in logs.text
    monkeypatch.undo()
    run(quick_config(run_name="full", num_server_rounds=2, fraction_evaluate=0.0, resume=str(folder)), num_nodes=2)
    assert [r["round"] for r in history(cfg)] == [0, 1, 2] and summary(cfg)["status"] == "finished"


def test_a_disk_too_full_for_even_the_summary_says_so_in_the_log_and_lets_the_lock_go(quick_config, monkeypatch, logs):
    cfg = quick_config(run_name="nothing", num_server_rounds=1, fraction_evaluate=0.0)
    folder = run_dir_of(cfg)
    _fail_writes(monkeypatch, lambda path: path.name != "config.json" and path.name != "metrics.json")
    with pytest.raises(RunFailed):
        run(cfg, num_nodes=2)
    assert "cannot write the failed status to" in logs.text and "No space left on device" in logs.text
    assert not (folder / "run.lock").exists()


def test_a_bug_in_the_loop_is_a_failed_run_not_a_running_one(quick_config, monkeypatch, logs):
    cfg = quick_config(run_name="bug", num_server_rounds=1, fraction_evaluate=0.0)

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("server_app.round_loop.RoundLoop._log_round", broken)
    with pytest.raises(ZeroDivisionError):
        run(cfg, num_nodes=2)
    status = summary(cfg)
    assert status["status"] == "failed"
    assert status["reason"].startswith("the ServerApp failed: ZeroDivisionError: planted")
    assert not (run_dir_of(cfg) / "run.lock").exists()


# -- the guard: a killed ServerApp's summary ------------------------------------------------------
SERVERAPP = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from fedprime_core.runguard import RunGuard
    from fedprime_core.runlock import RunLock
    folder = Path(sys.argv[1])
    lock = RunLock(folder, "a ServerApp to be killed").acquire()
    (folder / "summary.json").write_text(json.dumps({"status": "running", "metric": "accuracy"}))
    (folder / "summary.md").write_text("# title\\n\\nMetric: accuracy\\n")
    (folder / "checkpoint.json").write_text(json.dumps({"round": 3}))
    guard = RunGuard(folder, sys.argv[3] if len(sys.argv) > 3 else None).start()
    print(guard.process.pid, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    (folder / "summary.json").write_text(json.dumps({"status": "finished"}))
    guard.stop()
    lock.release()
    """
)


def _serverapp(folder: Path, how: str, *superlink: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", SERVERAPP, str(folder), how, *superlink],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(proc.stdout.split()[0])


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_serverapps_summary_is_marked_failed_and_its_lock_released(tmp_path):
    guard = _serverapp(tmp_path, "kill")
    assert _gone(guard), "the guard outlived its ServerApp"
    status = json.loads((tmp_path / "summary.json").read_text())
    assert status["status"] == "failed" and status["metric"] == "accuracy"
    assert "ended without finishing after round 3" in status["reason"] and "it was killed" in status["reason"]
    assert f"resume='{tmp_path}'" in status["reason"]
    assert "**Run failed:** the ServerApp (process" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "run.lock").exists()


def test_a_serverapp_whose_superlink_is_gone_is_marked_failed_with_that_reason(tmp_path):
    guard = _serverapp(tmp_path, "kill", "127.0.0.1:9")  # the discard port: nothing listens
    assert _gone(guard)
    reason = json.loads((tmp_path / "summary.json").read_text())["reason"]
    assert "its SuperLink at 127.0.0.1:9 is gone; restart the SuperLink, then resume with resume=" in reason


def test_a_serverapp_that_ends_by_itself_leaves_its_status_to_itself(tmp_path):
    guard = _serverapp(tmp_path, "finish")
    assert _gone(guard)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "finished"}


def test_the_guard_leaves_a_folder_a_new_serverapp_already_holds(tmp_path):
    """The old ServerApp died, a resume took the lock first: the guard must not touch its run."""
    lock = RunLock(tmp_path, "the old one").acquire()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
    reader, writer = os.pipe()
    guard = subprocess.Popen(
        [sys.executable, "-m", "fedprime_core.runguard", str(tmp_path), "999999", str(reader)],
        pass_fds=(reader,),
        cwd=ROOT,
    )
    os.close(reader)
    os.close(writer)  # "the ServerApp died" while this process still holds the lock: a live owner
    assert guard.wait(timeout=30) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "running"}
    assert lock.path.exists()
    lock.release()


def test_the_guard_starts_and_stops_with_the_serverapp(quick_config, monkeypatch):
    cfg = quick_config(run_name="guarded", num_server_rounds=1, fraction_evaluate=0.0)
    started = []
    real = RunGuard.start

    def start(self):
        started.append(real(self))
        return started[-1]

    monkeypatch.setattr(RunGuard, "start", start)
    run(cfg, num_nodes=2)
    assert len(started) == 1 and started[0].process.poll() is not None
    assert summary(cfg)["status"] == "finished"


# -- a real full and read-only file system (a tmpfs in a private mount namespace) -----------------
def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


RUN_IN_NAMESPACE = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {root!r})
    from fedprime_core.config import parse_run_config
    from tests.loopback import run_server
    cfg = parse_run_config(json.loads(sys.argv[1]))
    try:
        run_server(cfg, num_nodes=2)
    except BaseException as exc:
        print("RAISED", type(exc).__name__, exc)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged mount namespaces (unshare -rm)")
@pytest.mark.parametrize("mount", ["size=200k", "ro"])
def test_a_really_full_or_read_only_results_folder(quick_config, tmp_path, mount):
    """The results folder is a 200 kB tmpfs (filled by the first checkpoints) or a read-only one."""
    results = tmp_path / "mnt"
    results.mkdir()
    cfg = quick_config(results_dir=str(results), run_name="r", num_server_rounds=6, fraction_evaluate=0.0)
    script = _quote(RUN_IN_NAMESPACE.format(root=str(ROOT)))
    settings = _quote(json.dumps(config_to_dict(cfg)))
    inner = f"mount -t tmpfs -o {mount} tmpfs {results} && {sys.executable} -c {script} {settings}"
    if mount != "ro":
        inner += f" ; cat {results}/r/summary.json ; ls -a {results}/r"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", inner], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if mount == "ro":
        assert "FedPrime cannot start: the run folder" in out and "Read-only file system" in out, out[-3000:]
        assert "RAISED OSError" in out
    else:
        assert "RAISED RunFailed" in out and "No space left on device" in out, out[-3000:]
        assert '"status": "failed"' in out and "No space left on device" in out.split('"status": "failed"')[1]
        assert "run.lock" not in out.split("RAISED")[1]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
