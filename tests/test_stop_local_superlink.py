"""scripts/stop_local_superlink.sh stops the local SuperLink of one FLWR_HOME by its pid, and no other."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.processes import ROOT


def _fake_superlink(home) -> subprocess.Popen:
    """A process whose command line is the one `flwr run` gives the local SuperLink of ``home``."""
    argv0 = (
        "flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port 39091 "
        f"--log-file {home}/local-superlink/superlink.log --log-rotation-interval-hours 24"
    )
    return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" sleep 300'])


def _disguised(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until ``exec -a`` has given ``proc`` the SuperLink's command line (slow on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b"flower-superlink" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {proc.pid} never took the SuperLink's command line")


def _running(proc: subprocess.Popen, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return True


def test_only_the_superlink_of_this_flwr_home_is_stopped(tmp_path, monkeypatch):
    # A terminal width in the environment (pytest-xdist's workers have one) once cut ps's
    # command lines to 80 characters, and the script no longer saw the --log-file it looks for.
    monkeypatch.setenv("COLUMNS", "80")
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    procs = [_fake_superlink(mine), _fake_superlink(theirs)]
    try:
        for proc in procs:
            _disguised(proc)
        env = {**os.environ, "FLWR_HOME": str(mine)}
        out = subprocess.run(
            ["bash", str(ROOT / "scripts/stop_local_superlink.sh")], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert f"pid {procs[0].pid}" in out.stdout
        assert not _running(procs[0], timeout=5)
        assert procs[1].poll() is None  # another home's SuperLink keeps running
        again = subprocess.run(
            ["bash", str(ROOT / "scripts/stop_local_superlink.sh")], env=env, capture_output=True, text=True
        )
        assert again.returncode == 0 and "no local SuperLink" in again.stdout
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
