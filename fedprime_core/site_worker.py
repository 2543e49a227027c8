"""A site's resident worker: the backbone and the site's data loaded once per run, not once per message.

In deployment Flower runs every message a SuperNode receives (the identity query, each
train and each evaluate) in a fresh ClientApp process (``flwr-clientapp``, started by the
SuperNode's SuperExec; Flower 1.42's prestarted task workers also serve exactly one task
each). A ClientApp that did the work itself would import torch and transformers, load the
frozen backbone and read the site's folder for every message: minutes per round on a real
backbone, for seconds of training. So a site runs one more process beside its SuperNode, the
**resident worker** (``python -m fedprime_core.site_worker --socket PATH``;
``scripts/start_supernode.sh`` starts it), which keeps everything loaded between messages
in :mod:`fedprime_core.runtime`'s process caches. The SuperNode's node config names its
socket (``site-worker="PATH"``); the ClientApp then imports neither torch nor the method,
hands each message's arrays to the worker and turns what comes back into its reply. Without
``site-worker`` the ClientApp does the work in its own process (:class:`LocalSite`: the
simulation's long-lived actors, or a site that runs no worker).

The channel is a Unix socket, private to the site: created with mode 0600 (only the user
who started the worker may connect; the worker also refuses a peer with another uid), never
a network port. A request and its reply are each one frame: a JSON header (the operation,
the run and node configs, the node id, the round) followed by the raw bytes of its NumPy
arrays (:func:`send_frame`, :func:`recv_frame`). A worker serves one request at a time. When
a new run starts it drops what it read for the previous one (a site's files may have been
fixed since) but keeps the backbone.

Failures stay honest: an error in the work comes back as the same one-line reason the
ClientApp would have sent itself (:func:`fedprime_core.failures.exception_reason`); a worker
that is not running, or dies mid-request, makes the ClientApp fail at once with a
:class:`SiteWorkerError` that says so (the server counts the client as failed), never a
hang: the kernel closes a dead worker's socket.

Nothing here imports torch at module level: a ClientApp that talks to a worker stays thin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .node import NodeSetup, node_setup

LOGGER = logging.getLogger(__name__)

#: The node config key naming the socket of the site's resident worker.
NODE_CONFIG_KEY = "site-worker"
_MAGIC = b"FPSW"
_VERSION = 1
_PREFIX = struct.Struct(">4sII")  # magic, version, header length
#: Largest JSON header a frame may carry (a run config and a few hundred log lines fit easily).
MAX_HEADER_BYTES = 16 * 2**20
#: Seconds a ClientApp waits to be connected to the worker (the work itself may take hours).
CONNECT_TIMEOUT = 10.0
#: Seconds the worker allows for reading one request or sending one reply.
IO_TIMEOUT = 120.0


class SiteWorkerError(RuntimeError):
    """The site's resident worker cannot be reached, or went away before it replied."""


class WorkerFailure(RuntimeError):
    """The worker ran the request and it failed; ``reason`` is its one-line reason, as the ClientApp would send it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Frames: a JSON header, then the raw bytes of the arrays it lists
# ---------------------------------------------------------------------------------------
def send_frame(stream: BinaryIO, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Write one frame: ``header`` (JSON) and ``arrays`` (name, dtype and shape in the header, bytes after it)."""
    specs, buffers = [], []
    for name, value in (arrays or {}).items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {array.dtype}; only plain numeric arrays cross the channel")
        specs.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # (a 0-d array keeps its shape)
    head = json.dumps({**header, "arrays": specs}, separators=(",", ":"), default=_plain).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    stream.write(_PREFIX.pack(_MAGIC, _VERSION, len(head)))
    stream.write(head)
    for buffer in buffers:
        stream.write(memoryview(buffer))
    stream.flush()


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays in a header as plain JSON numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r:.80} cannot cross the site-worker channel")


def recv_frame(stream: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame written by :func:`send_frame`: ``(header, arrays)`` (the arrays are writable copies).

    Raises:
        ConnectionError: the other side closed the channel before a whole frame arrived.
        ValueError: the bytes are not a frame of this protocol.
    """
    magic, version, size = _PREFIX.unpack(_read_exact(stream, _PREFIX.size))
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"not a site-worker frame (magic {magic!r}, version {version})")
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    header = json.loads(_read_exact(stream, size))
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ValueError("frame header is not a JSON object with an 'arrays' list")
    arrays = {}
    for spec in header.pop("arrays", []):
        dtype = np.dtype(spec["dtype"])
        if dtype.hasobject:
            raise ValueError(f"array {spec['name']!r} has dtype {dtype}")
        shape = tuple(int(n) for n in spec["shape"])
        if any(n < 0 for n in shape):
            raise ValueError(f"array {spec['name']!r} has a negative dimension {shape}")
        data = bytearray(_read_exact(stream, dtype.itemsize * int(np.prod(shape, dtype=np.int64))))
        arrays[str(spec["name"])] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return header, arrays


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise ConnectionError(f"channel closed after {0 if data is None else len(data)} of {size} bytes")
    return data


# ---------------------------------------------------------------------------------------
# What a site does: in this process, or in its resident worker
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainOutcome:
    """One round of local training, as the ClientApp needs it for its reply.

    Attributes:
        state: the trained arrays (float32).
        metrics: ``num-examples``, ``train-loss``, ``train-regulariser``, ``train-seconds``, ``steps``.
        usage: pool name -> ``(pool size,)`` prompt selection counts.
        pattern_usage: pool name -> ``(3, pool size)`` the same split by missing pattern.
        client: the client-info record (:func:`fedprime_core.runtime.client_info`).
    """

    state: dict[str, np.ndarray]
    metrics: dict[str, float | int]
    usage: dict[str, np.ndarray]
    pattern_usage: dict[str, np.ndarray]
    client: dict[str, Any]


class LocalSite:
    """A site's work done in this process, through :mod:`fedprime_core.runtime` and its caches.

    What the ClientApp does without a worker, and what the worker does for it. Every call gets
    the message's :class:`~fedprime_core.node.NodeSetup`: the node and its effective config.
    """

    def check(self, setup: NodeSetup) -> dict[str, Any]:
        """``{"client": identity fields, "site-check": ...}`` (``site-check`` ``None`` for a partition)."""
        from . import runtime

        node = setup.node  # the check applies the node's view itself: a site whose data cannot go with the run is told
        check = runtime.site_check(setup.run_cfg, node) if node.site_local else None
        return {"client": node.describe(), "site-check": check}

    def train(self, setup: NodeSetup, state: Mapping[str, np.ndarray], server_round: int) -> TrainOutcome:
        from . import runtime

        _limit_threads()
        cfg, node = setup.cfg, setup.node
        new_state, result, shard = runtime.client_train(cfg, state, node, server_round=server_round)
        return TrainOutcome(
            state=dict(new_state),
            metrics={
                "num-examples": result.num_examples,
                "train-loss": result.loss,
                "train-regulariser": result.regulariser,
                "train-seconds": result.seconds,
                "steps": result.steps,
            },
            usage={k: np.asarray(v) for k, v in result.usage.items()},
            pattern_usage={k: np.asarray(v) for k, v in (result.pattern_usage or {}).items()},
            client=runtime.client_info(cfg, node, shard),
        )

    def evaluate(self, setup: NodeSetup, state: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
        from . import runtime

        _limit_threads()
        started = time.perf_counter()
        metrics = dict(runtime.client_evaluate(setup.cfg, state, setup.node))
        return {**metrics, "eval-seconds": time.perf_counter() - started}, setup.node.describe()


def _limit_threads() -> None:
    import torch

    # Simulation packs several clients on few cores; never oversubscribe them.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))


class WorkerSite:
    """A site's work done by its resident worker at ``socket_path`` (the same calls as :class:`LocalSite`).

    The worker is sent the setup's run config, node config and node id, and makes its own
    :class:`~fedprime_core.node.NodeSetup` from them (:meth:`SiteWorker.handle`).

    Raises (every method):
        SiteWorkerError: no worker listens at the path, or it went away mid-request.
        WorkerFailure: the worker ran the request and it failed (its one-line reason).
    """

    def __init__(self, socket_path: str, run_id: int = 0) -> None:
        self.socket_path = socket_path
        self.run_id = run_id

    def check(self, setup: NodeSetup) -> dict[str, Any]:
        header, _ = self._call("check", setup)
        return {"client": header["client"], "site-check": header.get("site-check")}

    def train(self, setup: NodeSetup, state: Mapping[str, np.ndarray], server_round: int) -> TrainOutcome:
        header, arrays = self._call("train", setup, {"server-round": server_round}, _prefixed("state/", state))
        return TrainOutcome(
            state=_unprefixed("state/", arrays),
            metrics=header["metrics"],
            usage=_unprefixed("usage/", arrays),
            pattern_usage=_unprefixed("pattern-usage/", arrays),
            client=header["client"],
        )

    def evaluate(self, setup: NodeSetup, state: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
        header, _ = self._call("evaluate", setup, arrays=_prefixed("state/", state))
        return header["metrics"], header.get("client", {})

    def status(self) -> dict[str, Any]:
        """The worker's pid, uptime, requests served and backbone loads."""
        return self._call("status", None)[0]

    def _call(
        self,
        op: str,
        setup: NodeSetup | None,
        fields: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        header = {
            "op": op,
            "run-id": int(self.run_id),
            "run-config": dict(setup.run_config) if setup else {},
            "node-config": dict(setup.node_config) if setup else {},
            "node-id": setup.node_id if setup else 0,
            **(fields or {}),
        }
        started = time.monotonic()
        with _connect(self.socket_path) as sock, sock.makefile("rwb") as stream:
            try:
                send_frame(stream, header, arrays)
                reply, out = recv_frame(stream)
            except (ConnectionError, OSError, ValueError) as exc:
                raise SiteWorkerError(
                    f"the site worker at {self.socket_path} went away before it answered the {op} request "
                    f"({type(exc).__name__}: {exc}; after {time.monotonic() - started:.1f}s): it crashed or was "
                    "stopped; its log is where the site was started; restart the site (scripts/start_supernode.sh)"
                ) from None
        _replay_log(reply.get("log", []))
        if reply.get("error"):
            raise WorkerFailure(str(reply["error"]))
        return reply, out


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise SiteWorkerError(
            f"no site worker answers at {path} ({exc.strerror or exc}): start the site with "
            "scripts/start_supernode.sh (it starts the worker), or run "
            f"`python -m fedprime_core.site_worker --socket {path}` on this machine; or drop "
            f"'{NODE_CONFIG_KEY}' from the SuperNode's node config to work in the ClientApp's own process"
        ) from None
    sock.settimeout(None)  # local training may take as long as it takes; a dead worker closes the socket
    return sock


def _prefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in arrays.items()}


def _unprefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}


def _replay_log(lines: list) -> None:
    """Log in this process what the worker logged for the request (so the ClientApp forwards it)."""
    for item in lines:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], int):
            LOGGER.log(item[0], "%s", item[1])


def site_for(node_config: Mapping[str, Any], run_id: int = 0) -> LocalSite | WorkerSite:
    """The site that does a ClientApp's work: its resident worker when the node config names one."""
    path = node_config.get(NODE_CONFIG_KEY, "")
    if not path:
        return LocalSite()
    if not isinstance(path, str) or not os.path.isabs(path):
        from .config import ConfigError

        raise ConfigError(
            f"node config key '{NODE_CONFIG_KEY}' = {path!r} must be the absolute path of the site worker's socket"
        )
    return WorkerSite(path, run_id)


# ---------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------
class _Collector(logging.Handler):
    """The lines logged while a request is served (returned with the reply, at most 200)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.lines: list[list] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 200:
            try:
                self.lines.append([int(record.levelno), record.getMessage()])
            except Exception:  # noqa: BLE001 - a malformed log call must not fail the request
                self.lines.append([int(record.levelno), str(record.msg)])


class SiteWorker:
    """Serves a site's requests over a Unix socket, one at a time (see the module docstring)."""

    def __init__(self, socket_path: str | Path, level: int = logging.INFO) -> None:
        self.socket_path = Path(socket_path)
        self.level = level
        self.site = LocalSite()
        self.started = time.time()
        self.served = 0
        self.run_id: int | None = None
        self._server: socket.socket | None = None

    def bind(self) -> None:
        """Create the socket (mode 0600), refusing to take over a path another live worker serves."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(2.0)
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket of a worker that died
            else:
                raise SiteWorkerError(f"another site worker already serves {path}; stop it or choose another --socket")
            finally:
                probe.close()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no moment in which others may connect
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(16)
        self._server = server

    def serve_forever(self) -> None:
        assert self._server is not None, "bind() first"
        while True:
            connection, _ = self._server.accept()
            with connection:
                if not _same_user(connection):
                    continue
                self.serve_one(connection)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            if self.socket_path.is_socket():
                self.socket_path.unlink()
        except OSError:
            pass

    def serve_one(self, connection: socket.socket) -> None:
        """Read one request, run it, send the reply (a ClientApp that left is not an error).

        Reading the request and sending the reply may take at most :data:`IO_TIMEOUT` seconds
        each (a peer that connects and says nothing cannot hold the site up); the work between
        them takes as long as it takes.
        """
        connection.settimeout(IO_TIMEOUT)
        with connection.makefile("rwb") as stream:
            try:
                header, arrays = recv_frame(stream)
            except (ConnectionError, OSError, ValueError) as exc:
                LOGGER.warning("site worker: unreadable request (%s: %s)", type(exc).__name__, exc)
                return
            reply, out = self.handle(header, arrays)
            try:
                send_frame(stream, reply, out)
            except OSError as exc:
                LOGGER.warning("site worker: the ClientApp left before the reply (%s)", exc)

    def handle(
        self, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Run one request: ``(reply header, reply arrays)``; a failure becomes ``{"error": reason}``."""
        from .failures import exception_reason

        op = header.get("op")
        collector = _Collector(self.level)
        loggers = [logging.getLogger(name) for name in ("fedprime_core", "fedprime_protocol")]
        for logger in loggers:
            logger.addHandler(collector)
        started = time.monotonic()
        try:
            if op == "status":
                reply, out = self.status(), {}
            else:
                self._new_run(int(header.get("run-id", 0)))
                reply, out = self._run(str(op), header, arrays)
            self.served += 1
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply the ClientApp can send on
            for logger in loggers:
                logger.removeHandler(collector)
            LOGGER.exception("site worker: %s request failed", op)
            return {"error": exception_reason(exc), "log": collector.lines}, {}
        for logger in loggers:
            logger.removeHandler(collector)
        LOGGER.info("site worker: %s served in %.1fs", op, time.monotonic() - started)
        return {**reply, "log": collector.lines}, out

    def status(self) -> dict[str, Any]:
        from . import runtime

        return {
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "served": self.served,
            "run-id": self.run_id,
            "backbone-loads": runtime.backbone_loads(),
        }

    def _new_run(self, run_id: int) -> None:
        if run_id == self.run_id:
            return
        if self.run_id is not None:
            from . import runtime

            dropped = runtime.forget_cached(keep=("backbone",))
            LOGGER.info(
                "site worker: run %s starts; %d cached object(s) of run %s dropped", run_id, dropped, self.run_id
            )
        self.run_id = run_id

    def _run(
        self, op: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if op not in ("check", "train", "evaluate"):
            raise ValueError(f"unknown site worker operation {op!r}")
        # The node and its effective config, once per request (the ClientApp sent what it read them from).
        setup = node_setup(header["run-config"], header["node-config"], int(header.get("node-id", 0)))
        if op == "check":
            return self.site.check(setup), {}
        state = _unprefixed("state/", arrays)
        if op == "train":
            outcome = self.site.train(setup, state, int(header.get("server-round", 0)))
            out = {
                **_prefixed("state/", outcome.state),
                **_prefixed("usage/", outcome.usage),
                **_prefixed("pattern-usage/", outcome.pattern_usage),
            }
            return {"metrics": outcome.metrics, "client": outcome.client}, out
        metrics, client = self.site.evaluate(setup, state)
        return {"metrics": metrics, "client": client}, {}


def _same_user(connection: socket.socket) -> bool:
    """Whether the peer runs as this process's user (Linux ``SO_PEERCRED``; elsewhere the socket's mode decides)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    pid, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    if uid not in (os.getuid(), 0):
        LOGGER.warning("site worker: refused a connection from pid %d of uid %d", pid, uid)
        return False
    return True


def _watch_parent(parent_pid: int, every: float = 2.0) -> None:
    """Exit when the process that started the worker (the site's start script) is gone."""

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                LOGGER.info("site worker: the site (pid %d) stopped; exiting", parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=watch, name="site-worker-parent", daemon=True).start()


def _warm_imports() -> None:
    """Import torch, transformers and the runtime while no request waits (the first one then pays none of it)."""
    started = time.monotonic()
    from . import runtime  # noqa: F401  (torch, the method, the data pipeline)
    from .backbones import vilt  # noqa: F401  (transformers)

    try:  # weight-loading progress bars are unreadable in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    LOGGER.info("site worker: torch and transformers imported in %.1fs", time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.site_worker",
        description="A site's resident worker: keeps the backbone and the site's data loaded between the "
        "messages of a run (see the module docstring). scripts/start_supernode.sh starts it.",
    )
    parser.add_argument("--socket", required=True, help="path of the Unix socket to serve (created with mode 0600)")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FLWR_LOG_LEVEL", "INFO"),
        help="level of the lines returned with each reply and printed here (default: FLWR_LOG_LEVEL or INFO)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.getLevelName(str(args.log_level).upper())
    level = level if isinstance(level, int) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(asctime)s site-worker | %(message)s", "%H:%M:%S"))
    # The worker's own lines print here; a request's lines travel back to the ClientApp, which
    # prints and forwards them as if it had done the work itself (so nothing prints twice).
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    core = logging.getLogger("fedprime_core")
    core.setLevel(level)
    core.propagate = False
    if not isinstance(args.socket, str) or not os.path.isabs(args.socket):
        print(f"--socket {args.socket!r} must be an absolute path", file=sys.stderr)
        return 2
    worker = SiteWorker(args.socket, level=level)

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.bind()
    except (SiteWorkerError, OSError) as exc:
        print(f"site worker: cannot serve {args.socket}: {exc}", file=sys.stderr)
        return 1
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    LOGGER.info("site worker: serving %s (pid %d)", args.socket, os.getpid())
    try:
        _warm_imports()
        worker.serve_forever()
    except SystemExit:
        pass
    finally:
        worker.close()
        LOGGER.info("site worker: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
