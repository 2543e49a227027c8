"""Launch `flwr run` as a subprocess and clean up the Flower processes it leaves behind.

`flwr run` in simulation starts a background local SuperLink that keeps running after the
run. A launcher gives its Flower processes a private ``FLWR_HOME`` and private ports for
that local SuperLink (:func:`local_superlink_ports`); :func:`stop_marked` then ends exactly
the processes whose environment carries that marker, and nothing else. This module starts
programs; it does not import Flower.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

#: Repository root (where pyproject.toml with the Flower app lives).
APP_DIR = Path(__file__).resolve().parents[2]


#: What a Flower app bundle (FAB) of this project needs: the app's packages and metadata.
APP_FILES = ("pyproject.toml", "README.md", "fedprime_core", "fedprime_protocol", "server_app", "client_app")


def stage_app(dest: Path) -> Path:
    """Copy the app's own files (:data:`APP_FILES`) to ``dest`` and return it.

    ``flwr run <dir>`` walks every file under ``<dir>`` before filtering them for the FAB;
    in a checkout with an in-tree ``.venv`` and a growing ``results/`` that walk costs
    about 8 s per run on 2 cores. Launchers that start many runs (the experiment grid)
    run them from a staged copy instead. The copy is a snapshot: stage again after
    editing the code.
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in APP_FILES:
        src = APP_DIR / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


#: Flower's variables for the ports of the local SuperLink `flwr run` starts (default 39091 / 39093).
LOCAL_SUPERLINK_PORT_VARS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def local_superlink_ports(home: Path) -> dict[str, str]:
    """Ports of this ``FLWR_HOME``'s own local SuperLink, chosen once and kept in ``home``.

    `flwr run` finds "the" local SuperLink by probing a fixed port (39091). Another user,
    test or experiment grid on the same machine that started one there would silently get
    this launcher's runs, and run their ClientApps with *its* code (in simulation the
    ClientApps import from the SuperLink's working directory, not from the app bundle).
    Private ports per ``FLWR_HOME`` keep every launcher on its own SuperLink.
    """
    home = Path(home)
    record = home / "local-superlink-ports.json"
    try:
        ports = json.loads(record.read_text())
        if sorted(ports) == sorted(LOCAL_SUPERLINK_PORT_VARS):
            return {k: str(v) for k, v in ports.items()}
    except (OSError, ValueError):
        pass
    sockets = [socket.socket() for _ in LOCAL_SUPERLINK_PORT_VARS]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = {var: str(sock.getsockname()[1]) for var, sock in zip(LOCAL_SUPERLINK_PORT_VARS, sockets)}
    finally:
        for sock in sockets:
            sock.close()
    home.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(ports))
    return ports


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower commands: private FLWR_HOME and local SuperLink, no runtime dependency installation,
    Ray on loopback only.

    Local SuperLink ports set in the caller's environment are kept.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        PYTHONUNBUFFERED="1",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        # Ray (the simulation engine) on 127.0.0.1 only: on Linux it listens on every interface otherwise.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    )
    for var, port in local_superlink_ports(home).items():
        env.setdefault(var, port)
    env.update(extra or {})
    return env


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment contains ``marker`` (such as ``FLWR_HOME=/tmp/x``)."""
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def stop_marked(marker: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process carrying ``marker``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.2)
        if not pids:
            return


T = TypeVar("T")

#: What ``flwr run`` prints when the local SuperLink it spawns does not answer within
#: Flower's hard-coded 15 s (a loaded machine); the run never started, so it is safe to retry.
SUPERLINK_START_FAILURE = "Failed to start local SuperLink within"


def retry_slow_superlink(
    run_once: Callable[[], tuple[int, str, T]], attempts: int = 3, echo: Callable[[str], None] | None = None
) -> T:
    """``run_once()`` -> ``(exit code, output, result)``, run again while the local SuperLink was slow to start.

    A `flwr` command whose output says :data:`SUPERLINK_START_FAILURE` did not run
    anything, and the SuperLink is usually up a few seconds later. Returns the last result.
    """
    for attempt in range(1, attempts + 1):
        code, output, result = run_once()
        if code == 0 or SUPERLINK_START_FAILURE not in output or attempt == attempts:
            return result
        if echo:
            echo(f"the local SuperLink was slow to start (attempt {attempt} of {attempts}); trying again")
        time.sleep(5.0)
    raise ValueError(f"attempts must be at least 1, got {attempts}")


def run_flwr(
    args: Sequence[str],
    env: Mapping[str, str],
    log_path: Path | None = None,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
    cwd: Path | None = None,
) -> tuple[int, str]:
    """Run ``flwr <args>`` in ``cwd`` (default: the repository root); stream its output to ``echo`` and ``log_path``.

    A run whose local SuperLink did not start in time (:data:`SUPERLINK_START_FAILURE`)
    is retried up to twice (:func:`retry_slow_superlink`).

    Returns:
        ``(exit code, full output)``; exit code 124 when ``timeout`` expired.
    """

    def once() -> tuple[int, str, tuple[int, str]]:
        code, output = _run_flwr_once(args, env, log_path, timeout, echo, cwd)
        return code, output, (code, output)

    return retry_slow_superlink(once, echo=echo)


def _run_flwr_once(
    args: Sequence[str],
    env: Mapping[str, str],
    log_path: Path | None,
    timeout: float | None,
    echo: Callable[[str], None] | None,
    cwd: Path | None,
) -> tuple[int, str]:
    cmd = ["flwr", *args]
    lines: list[str] = []
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed below
    try:
        with subprocess.Popen(
            cmd,
            cwd=cwd or APP_DIR,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc:
            start = time.monotonic()
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if echo:
                    echo(line.rstrip("\n"))
                if timeout and time.monotonic() - start > timeout:
                    proc.kill()
                    return 124, "".join(lines)
            return proc.wait(), "".join(lines)
    finally:
        if log:
            log.close()
