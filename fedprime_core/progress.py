"""Progress of long steps: log lines that read well in ``flwr log``, a tqdm bar on a terminal.

A step that can take more than a few seconds (generating a backbone, reading a dataset,
evaluating the held-out sets, a grid of runs) reports through :class:`Progress`. Where
the output is a log (the Flower apps: ``flwr run --stream``, ``flwr log``, a SuperNode's
console, a CI log) a bar is unreadable (every redraw is a new line or a carriage return),
so progress is a log line at most every ``every`` seconds::

    evaluating round 3 (full-modal): 1,920/4,800 samples (40%), 1m12s elapsed, about 1m48s left

and, when the step took that long, one closing line. A step that ends quickly logs
nothing (or only its start, with ``announce``). Command-line tools that own a terminal ask
for ``bar=True``: then, and only when stderr is a terminal, a tqdm bar is drawn instead.

This module does not configure logging; the Flower apps connect the ``fedprime_core``
loggers to Flower's handlers (``fedprime_protocol.logs``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

LOGGER = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m`` (rounded to what a person reads)."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def remaining_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Linear estimate of the time left after ``done`` of ``total`` units took ``elapsed`` seconds."""
    if done <= 0 or total <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed / done * (total - done))


class Progress:
    """Reports the progress of one long step (see the module docstring).

    Args:
        what: what is being done, e.g. ``"generating tiny-vilt"``; starts every line.
        total: units the step will process (``None``: unknown, no percentage or estimate).
        unit: name of a unit (``"steps"``, ``"rows"``, ``"samples"``).
        logger: where the lines go (default: this module's logger).
        every: seconds between two progress lines (and the shortest step that gets a
            closing line).
        announce: log a line when the step starts (for steps that are long by nature).
        bar: draw a tqdm bar instead of lines when stderr is a terminal.
        scale: amounts are shown divided by this (e.g. bytes counted, ``1e6`` with unit ``"MB"``).
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "",
        logger: logging.Logger | None = None,
        every: float = 10.0,
        announce: bool = False,
        bar: bool = False,
        scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.scale = scale
        self.total = total
        self.unit = unit
        self.logger = logger or LOGGER
        self.every = every
        self.clock = clock
        self.done = 0
        self.status = ""
        self.started = clock()
        self._last = self.started
        self._closed = False
        self._bar: Any = None
        if bar and _is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}" if unit else "it", file=sys.stderr)
        elif announce:
            size = f" ({self._amount(total)} {unit})" if total is not None and unit else ""
            self.logger.info("%s%s ...", what, size)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def update(self, n: int = 1, status: str | None = None) -> None:
        """``n`` more units are done; ``status`` names the current part (e.g. a held-out set)."""
        self.done += n
        if status is not None:
            self.status = status
        if self._bar is not None:
            self._bar.update(n)
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            return
        now = self.clock()
        if now - self._last >= self.every and (self.total is None or self.done < self.total):
            self._last = now
            self.logger.info("%s", self.line())

    def _amount(self, value: float) -> str:
        return f"{value:,}" if self.scale == 1.0 else f"{value / self.scale:,.1f}"

    def line(self) -> str:
        """The progress line for the current state."""
        head = f"{self.what} ({self.status})" if self.status else self.what
        unit = f" {self.unit}" if self.unit else ""
        elapsed = self.elapsed
        done = self._amount(self.done)
        if self.total is None:
            return f"{head}: {done}{unit}, {format_duration(elapsed)} elapsed"
        share = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{head}: {done}/{self._amount(self.total)}{unit} ({share:.0f}%), {format_duration(elapsed)} elapsed"
        left = remaining_seconds(elapsed, self.done, self.total)
        return text + (f", about {format_duration(left)} left" if left is not None else "")

    def close(self, summary: str = "") -> None:
        """End the step; logs ``what: done ... in <elapsed>`` if it took at least ``every`` seconds."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        elapsed = self.elapsed
        if elapsed >= self.every:
            amount = f"{self._amount(self.done)} {self.unit} " if self.unit else ""
            extra = f"; {summary}" if summary else ""
            self.logger.info("%s: done, %sin %s%s", self.what, amount, format_duration(elapsed), extra)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
