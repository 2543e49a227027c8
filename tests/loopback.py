"""An in-process Grid that delivers messages to the real ClientApp, for fast strategy tests.

It runs :data:`client_app.app.app` exactly as a SuperNode would (same Context fields, an
exception becomes an error reply), without Ray or network processes. Like Flower's grids it
gives every pushed message an id, and replies answer that id. A ``dead`` node is answered
by the SuperLink's own error reply (Flower's ``NODE_UNAVAILABLE`` message, whose source is
the SuperLink's node id 1, not the dead node's); an ``offline`` node never answers. The
end-to-end tests (`test_e2e_*.py`) run the same apps under real `flwr run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


class LoopbackGrid(Grid):
    """Nodes ``1..n`` with partition ids ``0..n-1``; ``offline`` ones never answer, the SuperLink answers for ``dead``.

    ``node_configs`` replaces the node configs (``[config of node 1, config of node 2, ...]``),
    e.g. site-local nodes that name their own ``data-dir``. ``last_first`` hands replies back
    latest node first (replies arrive in any order in a real federation).
    """

    pull_interval = 0.01

    def __init__(
        self,
        run_config: dict,
        num_nodes: int,
        offline: Iterable[int] = (),
        node_configs: list[dict] | None = None,
        dead: Iterable[int] = (),
        last_first: bool = False,
    ) -> None:
        from client_app.app import app

        self.app = app
        self.run_config = dict(run_config)
        self.nodes = {node: node - 1 for node in range(1, num_nodes + 1)}
        self.node_configs = {
            node: (node_configs[node - 1] if node_configs else {"partition-id": pid, "num-partitions": num_nodes})
            for node, pid in self.nodes.items()
        }
        self.offline = set(offline)
        self.dead = set(dead)
        self.last_first = last_first
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SERVER_NODE_ID

    # -- Grid interface ------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp at once; its reply waits to be pulled."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if node in self.offline:
                continue
            if node in self.dead:
                reply = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
            else:
                reply = self._deliver(message, node)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]
        return sorted(replies, key=lambda m: m.metadata.src_node_id, reverse=self.last_first)

    def _deliver(self, message: Message, node: int) -> Message:
        context = Context(
            run_id=1,
            node_id=node,
            node_config=dict(self.node_configs[node]),
            state=RecordDict(),
            run_config=self.run_config,
        )
        TaskIdentity.node_id = node
        try:
            return self.app(message, context)
        except Exception as exc:  # a crashing ClientApp becomes an error reply, as in Flower
            return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        finally:
            TaskIdentity.node_id = SERVER_NODE_ID

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))


def kill_the_server_in_round(monkeypatch: Any, server_round: int) -> Callable[[], None]:
    """Make the ServerApp die (``KeyboardInterrupt``) as it pushes round ``server_round``'s messages; returns
    what undoes it (then a resume can run the round)."""
    original = LoopbackGrid.push_messages

    def dies(self: LoopbackGrid, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages and messages[0].content["config"].get("server-round") == server_round:
            raise KeyboardInterrupt(f"server killed during round {server_round}")
        return original(self, messages)

    monkeypatch.setattr(LoopbackGrid, "push_messages", dies)
    return lambda: monkeypatch.setattr(LoopbackGrid, "push_messages", original)


def run_server(cfg: Any, num_nodes: int | None = None, **grid_options: Any) -> LoopbackGrid:
    """Run the real ServerApp main against the real ClientApp on loopback nodes; the grid it used.

    ``num_nodes`` defaults to one node per entry of ``node_configs`` when that option is
    given, else 3.
    """
    from fedprime_core.config import config_to_dict
    from server_app.app import main as server_main

    if num_nodes is None:
        num_nodes = len(grid_options["node_configs"]) if grid_options.get("node_configs") else 3
    run_config = config_to_dict(cfg)
    grid = LoopbackGrid(run_config, num_nodes, **grid_options)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


def run_dir_of(cfg: Any) -> Path:
    """The run folder of ``cfg``."""
    return Path(cfg.results_dir) / cfg.run_name


def history(cfg: Any) -> list[dict]:
    """The per-round records of ``cfg``'s run (its metrics.json)."""
    return json.loads((run_dir_of(cfg) / "metrics.json").read_text())


def loopback_strategy(cfg: Any, num_nodes: int = 3) -> tuple[Any, LoopbackGrid, dict]:
    """A FedPrimeStrategy over ``num_nodes`` loopback nodes, started from the run's initial state (no ServerApp).

    Returns ``(strategy, grid, initial state)``.
    """
    from fedprime_core import runtime
    from fedprime_core.config import config_to_dict
    from server_app.strategy import FedPrimeStrategy

    run_dir_of(cfg).mkdir(parents=True)
    state = runtime.initial_state(cfg)
    return FedPrimeStrategy(cfg, run_dir_of(cfg), state), LoopbackGrid(config_to_dict(cfg), num_nodes), state


def through_flower(content: RecordDict) -> RecordDict:
    """``content`` after Flower's protobuf serialisation and back (what crosses the network)."""
    proto = ProtoRecordDict()
    proto.ParseFromString(serde.recorddict_to_proto(content).SerializeToString())
    return serde.recorddict_from_proto(proto)


class Federation:
    """The ``federation`` fixture (tests/conftest.py): in-process runs and what they wrote.

    ``federation(cfg, num_nodes=None, **grid_options)`` is :func:`run_server`;
    ``federation.run_dir(cfg)`` and ``federation.history(cfg)`` read the run's folder.
    """

    __call__ = staticmethod(run_server)
    run_dir = staticmethod(run_dir_of)
    history = staticmethod(history)
