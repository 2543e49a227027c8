"""One writer per run folder: a lock file that names its owner and dies with it.

``run.lock`` in the run folder is held with an exclusive ``flock`` for as long as a
ServerApp writes the folder, and holds the owner's process id, host and start time. The
kernel releases an ``flock`` when its process dies, however it dies (``kill -9``, a crash
of the machine's container), so a lock left behind by a dead process is never in the way:
the next owner takes it over and logs whose it was. A second live process is refused with
a message naming the owner.

NFSv4 and local file systems honour ``flock`` across processes (NFS also across hosts).
Where a file system cannot lock at all, the run goes on with a warning.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunFolderBusy(RuntimeError):
    """Another live process writes this run folder."""


def _owner(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process"
    return f"process {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {owner.get('since', '?')})"


class RunLock:
    """The lock of one run folder; use as a context manager or call :meth:`acquire` / :meth:`release`.

    Args:
        run_dir: the run folder (created if needed).
        purpose: what the owner does, written into the lock (e.g. ``"ServerApp run 42"``).

    Raises (from :meth:`acquire`):
        RunFolderBusy: a live process holds the lock; the message names it and what to do.
    """

    def __init__(self, run_dir: Path, purpose: str = "") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None
        #: The previous owner whose lock was taken over (it had died), if any.
        self.taken_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = _owner(self.path)
                raise RunFolderBusy(
                    f"run folder {self.path.parent} is in use by {describe_owner(owner)}"
                    + (f", {owner['purpose']}" if owner.get("purpose") else "")
                    + "; two ServerApps must not write one run folder. Wait for it to end, or stop it "
                    f"(kill {owner.get('pid', '<pid>')} on {owner.get('host', 'its host')}) if it is left over "
                    "from a run whose SuperLink is gone, then start again"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _UNSUPPORTED:
                    raise
                LOGGER.warning(
                    "the file system of %s cannot lock files (%s): nothing stops a second ServerApp from "
                    "writing the same run folder",
                    self.path.parent,
                    exc.strerror,
                )
                return self
            # The holder we waited for may have removed the file after we opened it: lock the file
            # that is at the path now, or we would hold a lock nobody else can see.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _owner(self.path)
        if previous:
            self.taken_over = previous
            LOGGER.warning("took over the lock of %s: that process is gone", describe_owner(previous))
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": dt.datetime.now().isoformat(timespec="seconds"),
            "purpose": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go (removing first, so nobody locks a file about to vanish).

        A lock file that cannot be removed (the folder turned read-only) is only let go: it stays,
        unlocked, and counts as stale (:func:`lock_state`); the next owner takes it over.
        """
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            LOGGER.warning("cannot remove %s (%s): it stays behind, unlocked (stale)", self.path, exc.strerror or exc)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
