"""How FedPrime's log lines reach the user: Flower's console, ``flwr run --stream`` and ``flwr log``.

``fedprime_core`` never imports Flower; it logs through standard :mod:`logging` loggers
(``fedprime_core.*``), as do ``fedprime_protocol``, ``client_app`` and ``server_app``. Left
alone, nothing would configure them: their INFO lines would be dropped. This module
connects them to Flower's logging, which the ServerApp and ClientApp call once at import
(:func:`connect`):

* **Where Flower prints.** Records of those loggers go to the handlers of Flower's own
  logger (``flwr``: its console handler, plus any file handler Flower adds), so they look
  like Flower's lines and follow its level: INFO by default, ``FLWR_LOG_LEVEL``
  (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``) where the processes start. In the
  ServerApp process Flower sends that output to the SuperLink, which serves
  ``flwr run --stream`` and ``flwr log``.
* **What clients say.** A ClientApp's output never reaches ``flwr log`` by itself: in
  deployment each message runs in a process on the SuperNode's machine whose output stays
  there, and in simulation Ray forwards an actor's output but merges lines that differ
  only in their numbers ("client 0 round 1: loss 2.07" and "client 1 round 1: loss 1.98"
  become one line "[repeated 2x across cluster]"). So the ClientApp also collects the lines
  it logs while handling a message (:func:`forward_logs`) and returns them with its reply
  (a ConfigRecord ``client-log``), and the ServerApp logs them, prefixed with the client's
  id, as the replies arrive (:class:`ClientLogGrid`)::

      INFO :      client 0 | round 1: loss 2.0712 on 405 samples in 3.1s

  In deployment the client's lines are also printed on its SuperNode's console; in
  simulation the actors print only warnings and errors themselves (the rest arrives
  with the reply), so no line shows twice.

  What travels is what the client logs: losses, sample counts, its shard and dataset
  summaries, load times, warnings such as skipped bad rows (whose first reasons name file,
  row and field, and may quote up to 80 characters of the bad value). A site that keeps
  even that at home starts its SuperNode with the node config ``forward-logs=false``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import FLOWER_LOGGER, console_handler, log
from flwr.serverapp import Grid

from fedprime_core.identity import client_id_problem
from fedprime_core.progress import format_duration

from .replies import MAX_LOG_CHARS, MAX_LOG_LINES, parse_client_log

#: The loggers whose records are routed to Flower's handlers.
LOGGERS = ("fedprime_core", "fedprime_protocol", "client_app", "server_app")
#: Name of the ConfigRecord in which a client returns its log lines.
CLIENT_LOG = "client-log"
#: At most this many lines (of at most this many characters) travel with one reply.
MAX_LINES = MAX_LOG_LINES
MAX_CHARS = MAX_LOG_CHARS


def flower_level() -> int:
    """The level of Flower's console: INFO unless ``FLWR_LOG_LEVEL`` says otherwise."""
    return int(console_handler.level) or logging.NOTSET


class _ToFlower(logging.Handler):
    """Hands each record to the handlers of Flower's logger (with ``prefix`` before the message)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.prefix = ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.prefix:
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = self.prefix + record.getMessage(), None
        for handler in FLOWER_LOGGER.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


_BRIDGE = _ToFlower()


class _ReportedErrors(logging.Filter):
    """Drops Flower's "ServerApp raised an exception" record (with its traceback) for an error the
    ServerApp has already logged in one line (:func:`mark_reported`): a config error, a site refused,
    a failed run. The user's last line is then what to fix; Flower's exit code follows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, _REPORTED, False)


_REPORTED = "_fedprime_reported"
_QUIET = _ReportedErrors()


def mark_reported(exc: BaseException) -> BaseException:
    """Note that ``exc``'s message has been logged in one line: Flower logs no traceback for it (returns ``exc``)."""
    setattr(exc, _REPORTED, True)
    return exc


def connect(client: bool = False) -> None:
    """Route the FedPrime loggers to Flower's handlers, at Flower's level (idempotent).

    ``client``: this is a ClientApp process. Inside a simulation's Ray actor only warnings
    and errors are printed directly; every line reaches the server with the reply.
    """
    level = flower_level()
    _BRIDGE.setLevel(max(level, WARNING) if client and _in_ray_worker() else level)
    if not client and _QUIET not in FLOWER_LOGGER.filters:
        FLOWER_LOGGER.addFilter(_QUIET)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if _BRIDGE not in logger.handlers:
            logger.addHandler(_BRIDGE)
    # Progress bars of transformers / huggingface_hub (weight loading, ...) are unreadable
    # in a log; the apps report long steps as log lines instead.
    # No import here: in simulation the ServerApp and the ClientApp load in one process at the
    # same time, and importing a half-initialised transformers from this thread fails.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and callable(getattr(hf_logging, "disable_progress_bar", None)):
        hf_logging.disable_progress_bar()


def _in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a simulation's ClientApp actor)."""
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported ray is no Ray worker
        return False


# ---------------------------------------------------------------------------------------
# ClientApp side: collect a message's lines and return them with the reply
# ---------------------------------------------------------------------------------------
class _Collector(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.levels: list[int] = []
        self.lines: list[str] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) >= MAX_LINES:
            self.dropped += 1
            return
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not fail the client's reply
            text = str(record.msg)
        self.levels.append(int(record.levelno))
        self.lines.append(text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "...")


def forwarding_allowed(node_config: dict) -> bool:
    """The site's choice, node config ``forward-logs`` (default true; ``false``/``0``/``no`` keep lines home)."""
    value = node_config.get("forward-logs", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def forward_logs(handler: Callable[[Message, object], Message]) -> Callable[[Message, object], Message]:
    """Decorate a ClientApp handler so that the lines it logs travel back with its reply.

    Lines at Flower's level or above from the FedPrime loggers, at most :data:`MAX_LINES`,
    go into the reply's ``client-log`` ConfigRecord (``client``, ``levels``, ``lines``),
    unless the node config says ``forward-logs=false``.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context) -> Message:
        connect(client=True)
        if not forwarding_allowed(dict(context.node_config)):
            return handler(msg, context)
        from fedprime_core.identity import client_identity  # the server's name for this client

        label = client_identity(dict(context.node_config), context.node_id)
        collector = _Collector(flower_level())
        loggers = [logging.getLogger(name) for name in LOGGERS]
        for logger in loggers:
            logger.addHandler(collector)
        _BRIDGE.prefix = f"client {label} | "
        try:
            reply = handler(msg, context)
        finally:
            _BRIDGE.prefix = ""
            for logger in loggers:
                logger.removeHandler(collector)
        if collector.dropped:
            collector.levels.append(WARNING)
            collector.lines.append(f"... {collector.dropped} more line(s) not forwarded (see the client's console)")
        if collector.lines and not reply.has_error():
            reply.content[CLIENT_LOG] = ConfigRecord(
                {"client": label, "levels": collector.levels, "lines": collector.lines}
            )
        return reply

    return wrapper


# ---------------------------------------------------------------------------------------
# ServerApp side: log the lines that arrive with the replies
# ---------------------------------------------------------------------------------------
def log_client_lines(reply: Message) -> None:
    """Log the lines a client returned with ``reply`` (``client <id> | <line>``).

    What a client sends is bounded here (:func:`fedprime_protocol.replies.parse_client_log`):
    at most :data:`MAX_LINES` lines of :data:`MAX_CHARS` characters, control characters (ANSI
    escapes, line breaks that would forge a line of the server's own) shown as ``?``, levels
    clamped; a label that is no valid client id is replaced by the node id.
    """
    if reply.has_error() or CLIENT_LOG not in reply.content.config_records:
        return
    record = reply.content.config_records[CLIENT_LOG]
    label = record.get("client")
    if client_id_problem(label) is not None:
        label = f"node-{reply.metadata.src_node_id}"
    for level, line in parse_client_log(record.get("lines"), record.get("levels")):
        log(level, "client %s | %s", label, line)


class ClientLogGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that logs the client lines of every reply it returns.

    While it waits for replies it says so every ``every`` seconds (``waiting for 4 train
    replies, 40s elapsed``): a round's local training can take minutes on a real dataset.
    Everything else is the wrapped grid's: the strategy cannot tell the difference.
    """

    def __init__(self, grid: Grid, every: float = 20.0) -> None:
        self.grid = grid
        self.every = every

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            log_client_lines(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kinds = sorted({m.metadata.message_type for m in messages})
        what = f"{len(messages)} {'/'.join(kinds)} repl{'y' if len(messages) == 1 else 'ies'}"
        started = time.monotonic()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.every):
                log(INFO, "waiting for %s, %s elapsed", what, format_duration(time.monotonic() - started))

        thread = threading.Thread(target=heartbeat, name="fedprime-waiting", daemon=True)
        thread.start()
        try:
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        finally:
            done.set()
            thread.join()
        for reply in replies:
            log_client_lines(reply)
        return replies
