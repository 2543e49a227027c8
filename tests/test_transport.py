"""The server's transport: sampling, one message per node, and an exchange that notes what it could not send."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprime_core.config import parse_run_config
from fedprime_core.failures import RunFailed
from fedprime_protocol.messages import ARRAYS
from server_app.transport import Transport, build_dispatch, node_of


class ScriptedGrid:
    """Nodes that answer at once (``answers``), never (``silent``), or whose messages cannot be pushed."""

    pull_interval = 0.01

    def __init__(self, nodes=(1, 2, 3), silent=(), unpushable=()) -> None:
        TaskIdentity.task_id = TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        self.nodes, self.silent, self.unpushable = list(nodes), set(silent), set(unpushable)
        self.replies: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.unpushable:
                ids.append("")
                continue
            message.metadata.__dict__["_message_id"] = f"m-{node}"
            ids.append(message.metadata.message_id)
            if node not in self.silent:
                self.replies[message.metadata.message_id] = Message(content=RecordDict(), reply_to=message)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def _messages(nodes):
    return [Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]


def _transport(**overrides):
    return Transport(parse_run_config({"round-timeout": 0.2, "node-wait": 0, **overrides}))


def test_the_exchange_keeps_replies_and_tells_undelivered_from_silent_nodes():
    grid = ScriptedGrid(silent=[2], unpushable=[3])
    transport = _transport()
    messages = _messages([1, 2, 3])
    replies = transport.exchange(grid, messages, timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m-1"]
    assert transport.unsent == (3,)
    assert transport.silent_reason(3, "the train message") == (
        "rejected",
        "the train message could not be delivered to the SuperLink",
    )
    assert transport.silent_reason(2, "the train message") == (
        "timed-out",
        "no reply to the train message within round-timeout 0.2s",
    )
    assert transport.exchange(grid, [], timeout=1.0) == []


def test_the_exchange_stops_while_it_waits_when_the_superlink_is_gone():
    grid = ScriptedGrid(silent=[1])
    reasons = iter([None, "the SuperLink at 127.0.0.1:9091 is gone"])
    transport = Transport(parse_run_config({}), stop_check=lambda: next(reasons))
    with pytest.raises(RunFailed, match="SuperLink .* is gone"):
        transport.exchange(grid, _messages([1]), timeout=60.0)
    assert grid.pulls == 2  # it stopped at the second check, not after the timeout


def test_a_reply_finds_its_node_through_the_message_it_answers():
    grid = ScriptedGrid()
    [message] = _messages([2])
    grid.push_messages([message])
    reply = grid.pull_messages(["m-2"])[0]
    reply.metadata.__dict__["_src_node_id"] = 1  # made up by the SuperLink for a node that died
    assert node_of(reply, {"m-2": 2}) == 2
    assert node_of(reply, {}) == 1


def test_sampling_is_deterministic_per_seed_round_and_purpose_and_skips_refused_nodes():
    grid = ScriptedGrid(nodes=range(1, 11))
    transport = _transport(seed=3)

    def sample(server_round, purpose=1, fraction=0.5, excluded=()):
        excluded = dict.fromkeys(excluded, "refused")
        return transport.sample(grid, fraction, 2, 2, server_round, purpose, known={}, excluded=excluded)

    first = sample(1)
    assert first == sample(1) and len(first) == 5 and first == sorted(first)
    assert {tuple(sample(r)) for r in range(1, 6)} != {tuple(first)}  # rounds draw differently
    assert 4 not in sample(1, excluded=[4]) and len(sample(1, excluded=[4])) == 4
    assert len(sample(1, fraction=0.0)) == 2  # at least min-train-nodes
    assert _transport().sample(grid, 1.0, 1, 1, 1, 1, known={}, excluded={7: "refused"}) == [
        n for n in range(1, 11) if n != 7
    ]
    centralized = Transport(parse_run_config({"node-wait": 0}), centralized=True)
    assert centralized.sample(grid, 1.0, 1, 1, 1, 1, known={}, excluded={1: "refused"}) == [2]


def test_a_dispatch_encodes_the_shared_arrays_once_and_counts_the_bytes():
    ScriptedGrid()  # the task identity messages need
    shared = {"head": np.ones((4, 3), np.float32)}
    own = {"head": np.zeros((4, 3), np.float32)}
    arrays = {1: shared, 2: shared, 3: own}
    sent = build_dispatch(
        MessageType.TRAIN, ConfigRecord({"server-round": 1}), arrays, {1: "a", 2: "b", 3: "c"}, "float16", sampled=4
    )
    assert [m.metadata.dst_node_id for m in sent.messages] == [1, 2, 3]
    records = [m.content.array_records[ARRAYS] for m in sent.messages]
    assert records[0]["head"].data is records[1]["head"].data  # one encoding of the shared arrays
    assert all(r["head"].dtype == "float16" for r in records)  # in the run's wire dtype
    assert sent.nbytes == sum(r.count_bytes() for r in records) and sent.bytes_per_client == sent.nbytes / 3
    assert sent.sampled == 4 and dict(sent.clients) == {1: "a", 2: "b", 3: "c"}
    assert sent.destinations() == {}  # ids exist once the grid pushed the messages


def test_a_real_grid_is_polled_every_quarter_second_not_every_two(monkeypatch):
    """Flower's grids have no ``pull_interval``: the server polls at PULL_INTERVAL (a reply waits half of it)."""
    import server_app.transport as transport_module

    class Napped(Exception):
        pass

    class FlowerLikeGrid(ScriptedGrid):
        pass

    del ScriptedGrid.pull_interval  # as Flower's own grids: no such attribute
    try:
        grid = FlowerLikeGrid(silent=[1])
        naps: list[float] = []

        def nap(seconds: float) -> None:
            naps.append(seconds)
            raise Napped

        monkeypatch.setattr(transport_module.time, "sleep", nap)
        with pytest.raises(Napped):
            _transport().exchange(grid, _messages([1]), timeout=60.0)
    finally:
        ScriptedGrid.pull_interval = 0.01
    assert naps == [pytest.approx(transport_module.PULL_INTERVAL)] and transport_module.PULL_INTERVAL <= 0.25
