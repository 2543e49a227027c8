"""Stop the ServerApp when its SuperLink is gone, instead of running on where nobody sees it.

In simulation the ServerApp and the clients run inside one ``flwr-simulation`` process
that needs the SuperLink only for logs and status: killed SuperLink, the federation
would go on to the last round unseen. In deployment every grid call goes to the
SuperLink, and Flower retries a lost connection forever. Either way the process would
keep the run folder's lock (``run.lock``), so a resumed run could not start.

:class:`SuperLinkWatchdog` checks, every few seconds, that the SuperLink still accepts
connections on the address this process talks to. After ``timeout`` seconds without one
it marks the SuperLink lost: the strategy stops at its next step (it waits for replies in
short polls), keeping the checkpoint of the last completed round. If the process is stuck
inside a Flower call that retries forever, the watchdog interrupts it after a further
grace period the way Flower's own parent-process monitor does (SIGINT), which ends the
process through Flower's exit handlers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from logging import ERROR, WARNING
from typing import Any

from flwr.common.logger import log

from fedprime_core.failures import RunFailed

#: Command-line flags of Flower's app processes that name the SuperLink they serve.
_ADDRESS_FLAGS = ("--runtime-api-address", "--serverappio-api-address", "--simulationio-api-address")


def superlink_address(grid: Any, argv: list[str] | None = None) -> str | None:
    """``host:port`` of the SuperLink this ServerApp talks to, or ``None`` if it cannot be told.

    Deployment: the Runtime API address of Flower's HTTP grid. Simulation: the address
    ``flwr-simulation`` was started with. An in-process grid (tests) has none.
    """
    address = getattr(grid, "_addr", None)
    if isinstance(address, str) and ":" in address:
        return address
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        for flag in _ADDRESS_FLAGS:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether something accepts TCP connections at ``address``."""
    try:
        with socket.create_connection(_split(address), timeout=timeout):
            return True
    except OSError:
        return False


class SuperLinkWatchdog:
    """Watches one SuperLink address from a daemon thread.

    Args:
        address: ``host:port`` of the SuperLink.
        timeout: seconds without a connection after which the SuperLink counts as lost.
        interval: seconds between checks.
        interrupt_after: seconds after the loss at which the process is interrupted (SIGINT)
            if it has not stopped by itself; ``None`` never interrupts.
    """

    def __init__(
        self, address: str, timeout: float, interval: float = 5.0, interrupt_after: float | None = 30.0
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.interval = min(interval, max(timeout / 3, 0.2))
        self.interrupt_after = interrupt_after
        self.lost = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="superlink-watchdog", daemon=True)

    def start(self) -> SuperLinkWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def stop_reason(self) -> str | None:
        """Why the run must stop now (the SuperLink is lost), else ``None``."""
        return self.reason if self.lost.is_set() else None

    def check(self) -> None:
        """Raise :class:`~fedprime_core.failures.RunFailed` once the SuperLink is lost."""
        if self.lost.is_set():
            raise RunFailed(self.reason)

    def _watch(self) -> None:
        last_seen = time.monotonic()
        while not self._stop.wait(self.interval):
            if reachable(self.address, timeout=min(3.0, self.interval)):
                last_seen = time.monotonic()
                continue
            silent = time.monotonic() - last_seen
            if silent < self.timeout:
                log(WARNING, "the SuperLink at %s does not answer (%.0fs)", self.address, silent)
                continue
            self.reason = (
                f"the SuperLink at {self.address} has been unreachable for {silent:.0f}s "
                f"(superlink-timeout={self.timeout:g}); nobody can see or control this run any more"
            )
            log(ERROR, "%s: stopping this ServerApp", self.reason)
            self.lost.set()
            break
        else:
            return
        if self.interrupt_after is None or self._stop.wait(self.interrupt_after):
            return
        log(ERROR, "the ServerApp did not stop %.0fs after losing its SuperLink: interrupting it", self.interrupt_after)
        os.kill(os.getpid(), signal.SIGINT)
