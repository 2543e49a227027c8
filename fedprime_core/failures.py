"""What went wrong with a client or with a run, in one line a user can act on.

A client that fails reports ``"[kind] ExceptionType: message"`` (:func:`exception_reason`),
where ``kind`` is ``config`` or ``data`` for errors that will happen again every round
until a person fixes a file or a setting (:data:`PERMANENT_KINDS`), and is absent for
anything else (a crash, an injected fault, running out of memory: it may not recur). The
full traceback stays in the client's log; the server records only this line.

Replies that did not come from our ClientApp's own error handling (a Ray traceback in
simulation, Flower's ``"<class 'X'>:<'message'>"`` in deployment, the SuperLink's note about
a dead node) are reduced to the same one-line form by :func:`one_line`.

:func:`stop_reason` decides from one round's outcome whether the run can still learn:
it is the single place that turns client failures into a failed run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .config import ConfigError
from .data.records import DataError

#: Kinds of client failure that recur every round until a person fixes something.
PERMANENT_KINDS = ("config", "data")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_FLOWER_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.DOTALL)
#: Exceptions Flower and Ray wrap a ClientApp's own exception in; the wrapped one is the news.
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Fault|Interrupt|Exit|Warning)): ?(.*)$")
_TAG = re.compile(r"^\[(" + "|".join(PERMANENT_KINDS) + r")\] (.*)$", re.DOTALL)
#: Longest reason kept in metrics and logs (a message that long has said what it needs to).
MAX_REASON_CHARS = 500


class RunFailed(RuntimeError):
    """The run cannot go on (nothing can learn, or its SuperLink is gone); the message says why."""


def error_kind(exc: BaseException) -> str | None:
    """``"config"``, ``"data"``, or ``None`` for failures that may not recur."""
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, (DataError, FileNotFoundError)):
        return "data"
    return None


def exception_reason(exc: BaseException) -> str:
    """``"[kind] Type: message"`` in one line (``kind`` only for permanent errors)."""
    text = one_line(f"{type(exc).__name__}: {exc}")
    kind = error_kind(exc)
    return f"[{kind}] {text}" if kind else text


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A failure description without colour codes, traceback or line breaks.

    Flower's ``"<class 'pkg.Type'>:<'message'>"`` becomes ``"Type: message"``; a text that
    holds a Python traceback (a Ray actor's error) becomes its last exception line.
    """
    text = _ANSI.sub("", str(text)).strip()
    match = _FLOWER_REASON.match(text)
    if match:
        name, message = match.groups()
        text = f"{name.rsplit('.', 1)[-1]}: {message.strip()}"
    if "Traceback (most recent call last)" in text or re.search(r'^\s*File "', text, re.MULTILINE):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        found = [m.groups() for m in (_EXCEPTION_LINE.match(line) for line in lines) if m]
        own = [(n, m) for n, m in found if not n.rsplit(".", 1)[-1].startswith(_WRAPPERS)]
        if own or found:
            name, message = (own or found)[-1]
            short = name.rsplit(".", 1)[-1]
            text = f"{short}: {message}" if message else short
        else:
            text = " ".join(lines)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_reason(reason: str) -> tuple[str | None, str]:
    """``(kind, one-line text)`` of an error reason a client sent (or Flower made up)."""
    reason = "" if reason is None else str(reason)
    match = _TAG.match(reason.strip())
    if match:
        kind, text = match.groups()
        return kind, one_line(text)
    return None, one_line(reason)


@dataclasses.dataclass(frozen=True)
class ClientOutcome:
    """What became of one sampled client in one round.

    Attributes:
        node: the Flower node id.
        client: the client id, when known.
        status: ``accepted``, ``rejected`` or ``timed-out``.
        reason: one line for ``rejected`` and ``timed-out`` (empty for ``accepted``).
        kind: ``config`` / ``data`` when the rejection is a permanent client error.
    """

    node: int
    client: str | None
    status: str
    reason: str = ""
    kind: str | None = None

    def describe(self) -> str:
        who = f"node {self.node}" + (f" (client {self.client})" if self.client is not None else "")
        return f"{who}: {self.reason}" if self.reason else who


def stop_reason(outcomes: Sequence[ClientOutcome], skipped_in_a_row: int, max_skipped: int) -> str | None:
    """Why the run must stop after this round, or ``None`` while it can still learn.

    Args:
        outcomes: every client sampled this round.
        skipped_in_a_row: consecutive skipped rounds up to and including this one (0 if
            this round aggregated).
        max_skipped: the ``max-skipped-rounds`` setting (0: never stop for skipped rounds).

    The run stops when every sampled client failed with a permanent (config or data)
    error: the next round would fail the same way. It also stops after ``max_skipped``
    skipped rounds in a row, whatever the reasons.
    """
    if outcomes and all(o.status == "rejected" and o.kind in PERMANENT_KINDS for o in outcomes):
        reasons = sorted({o.reason for o in outcomes})
        if len(reasons) == 1:
            return f"every sampled client ({len(outcomes)}) failed with the same {outcomes[0].kind} error: {reasons[0]}"
        listed = "; ".join(o.describe() for o in outcomes)
        return f"every sampled client ({len(outcomes)}) failed with a config or data error: {listed}"
    if max_skipped and skipped_in_a_row >= max_skipped:
        counts = {s: sum(o.status == s for o in outcomes) for s in ("accepted", "rejected", "timed-out")}
        last = "; ".join(o.describe() for o in outcomes if o.status != "accepted") or "none"
        return (
            f"{skipped_in_a_row} consecutive rounds were skipped (max-skipped-rounds={max_skipped}); the last one had "
            f"{counts['accepted']} accepted, {counts['rejected']} rejected, {counts['timed-out']} timed out: {last}"
        )
    return None
