"""Process helpers for end-to-end tests (the same ones the experiments runner uses)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from fedprime_core.tools.launch import APP_DIR as ROOT
from fedprime_core.tools.launch import flower_env as _flower_env
from fedprime_core.tools.launch import marked_pids, retry_slow_superlink, stop_marked

__all__ = ["ROOT", "flower_env", "free_port", "marked_pids", "run_checked", "stop_marked"]


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    return _flower_env(home, extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_checked(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    def once() -> tuple[int, str, subprocess.CompletedProcess]:
        out = subprocess.run(cmd, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr, out

    out = retry_slow_superlink(once)  # flwr gives its local SuperLink a hard-coded 15 s
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out
