"""A run folder never says ``running`` for a ServerApp that is gone: a guard process that outlives it.

A ServerApp that ends by itself writes its final status (``finished`` or ``failed``, with the
reason) into ``summary.json`` and releases ``run.lock``. A ServerApp that is killed
(``kill -9``, the out-of-memory killer, its ``flwr-simulation`` or SuperExec parent taken
down with it) cannot: its summary would keep saying ``running`` and its lock file stay behind.

:class:`RunGuard` starts one small process per run (``python -m fedprime_core.runguard``) in
a session of its own, joined to the ServerApp by a pipe only the ServerApp holds open. When
the ServerApp ends normally it says so on the pipe and the guard exits. When the pipe closes
without that word, the ServerApp died: the guard takes the run folder's lock (it is free once
its owner is dead, and still held if a new ServerApp already resumed the run, in which case
the guard leaves everything alone), marks a summary that still says ``running`` as
``failed`` with the reason, removes the lock and exits. It never outlives the ServerApp by
more than a few seconds.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .runlock import LOCK_NAME

LOGGER = logging.getLogger(__name__)

#: What the ServerApp writes on the pipe when it ends by itself.
DONE = b"done"
#: How long the guard tries to take the lock after the ServerApp died (the kernel frees it at exit).
LOCK_WAIT_SECONDS = 3.0


class RunGuard:
    """The guard of one run folder, from the ServerApp's side.

    Args:
        run_dir: the run folder (holding ``run.lock`` and, from round 0 on, ``summary.json``).
        superlink: ``host:port`` of the SuperLink the ServerApp talks to, if known: the reason
            then says whether it was still there.
    """

    def __init__(self, run_dir: Path, superlink: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.superlink = superlink
        self._write: int | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> RunGuard:
        """Start the guard process; a guard that cannot start is logged and the run goes on without it."""
        read, write = os.pipe()  # not inherited by any other child: only the guard gets `read`
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedprime_core.runguard",
                    str(self.run_dir),
                    str(os.getpid()),
                    str(read),
                    self.superlink or "",
                ],
                pass_fds=(read,),
                stdin=subprocess.DEVNULL,  # and no output pipe held open after the ServerApp is gone
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a kill of the ServerApp's process group does not take the guard along
            )
        except OSError as exc:
            os.close(write)
            LOGGER.warning(
                "no guard for %s (%s): a killed ServerApp would leave its summary 'running'", self.run_dir, exc
            )
            return self
        finally:
            os.close(read)
        self._write = write
        return self

    def stop(self) -> None:
        """The ServerApp ends by itself: the guard exits without touching anything."""
        if self._write is None:
            return
        try:
            os.write(self._write, DONE)
        except OSError:
            pass
        finally:
            os.close(self._write)
            self._write = None
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _take_lock(path: Path, timeout: float) -> int | None:
    """An fd holding ``path``'s exclusive flock, or ``None`` if someone else holds it for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # released already: nothing to mark
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _reachable(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def mark_dead(run_dir: Path, pid: int, superlink: str | None = None) -> str | None:
    """After the ServerApp ``pid`` died: the reason written into a summary that said ``running``
    (``None`` when the folder needed nothing or belongs to a live process again)."""
    lock = run_dir / LOCK_NAME
    fd = _take_lock(lock, LOCK_WAIT_SECONDS)
    if fd is None:
        return None
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if isinstance(owner, dict) and owner.get("pid") not in (None, pid):
            return None  # a later ServerApp's lock file, left by a death the guard of that one handles
        reason = None
        summary_path = run_dir / "summary.json"
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict) and summary.get("status") == "running":
            from .results import mark_failed

            last = _last_round(run_dir)
            if superlink and not _reachable(superlink):
                why = f"its SuperLink at {superlink} is gone; restart the SuperLink, then"
            else:
                why = "it was killed (or crashed without a word);"
            reason = (
                f"the ServerApp (process {pid}) ended without finishing after round {last} at "
                f"{dt.datetime.now().isoformat(timespec='seconds')}: {why} resume with resume='{run_dir}'"
            )
            mark_failed(run_dir, reason)
        lock.unlink(missing_ok=True)
        return reason
    finally:
        os.close(fd)


def _last_round(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def main(argv: list[str]) -> int:
    run_dir, pid, fd = Path(argv[0]), int(argv[1]), int(argv[2])
    superlink = argv[3] if len(argv) > 3 and argv[3] else None
    word = b""
    while True:
        try:
            chunk = os.read(fd, 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        word += chunk
    if word.startswith(DONE):
        return 0
    try:
        mark_dead(run_dir, pid, superlink)
    except OSError:  # a folder that cannot be written any more: nothing more to do
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
