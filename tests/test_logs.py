"""What a user reads: FedPrime's lines reach Flower's output, clients' lines come back with their replies."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import FLOWER_LOGGER, console_handler

from fedprime_core.results import load_checkpoint
from fedprime_protocol.logs import CLIENT_LOG, MAX_LINES, ClientLogGrid, connect, forward_logs, log_client_lines
from tests.loopback import LoopbackGrid


class Seen(logging.Handler):
    """Collects what reaches Flower's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture()
def flower_output():
    seen = Seen()
    FLOWER_LOGGER.addHandler(seen)
    level = console_handler.level
    try:
        yield seen
    finally:
        FLOWER_LOGGER.removeHandler(seen)
        console_handler.setLevel(level)
        connect()


def test_fedprime_lines_reach_flowers_handlers_at_flowers_level(flower_output):
    connect()
    logging.getLogger("fedprime_core.runtime").info("dataset %s: %d train", "embedded", 2000)
    assert "dataset embedded: 2000 train" in flower_output.messages
    console_handler.setLevel(logging.WARNING)  # what FLWR_LOG_LEVEL=WARNING does
    connect()
    logging.getLogger("fedprime_core.runtime").info("quiet line")
    logging.getLogger("client_app.app").warning("loud line")
    assert "quiet line" not in flower_output.messages
    assert "loud line" in flower_output.messages


def _message(node: int = 1) -> Message:
    LoopbackGrid({}, 1)  # sets the task identity messages need outside a Flower process
    return Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_client_returns_its_lines_with_the_reply_and_the_server_logs_them(flower_output):
    @forward_logs
    def handler(msg: Message, context: Context) -> Message:
        logging.getLogger("fedprime_core.data.loaders").warning("food101 train: skipped %d bad row(s)", 3)
        logging.getLogger("client_app.app").info("round %d: loss %.4f on %d samples", 1, 2.0712, 405)
        logging.getLogger("some.other.library").info("not ours")
        return Message(content=RecordDict(), reply_to=msg)

    reply = handler(_message(), _context(**{"partition-id": 4, "num-partitions": 5}))
    record = reply.content.config_records[CLIENT_LOG]
    assert record["client"] == "4"
    assert record["lines"] == ["food101 train: skipped 3 bad row(s)", "round 1: loss 2.0712 on 405 samples"]
    assert record["levels"] == [logging.WARNING, logging.INFO]
    flower_output.records.clear()
    log_client_lines(reply)
    assert flower_output.messages == [
        "client 4 | food101 train: skipped 3 bad row(s)",
        "client 4 | round 1: loss 2.0712 on 405 samples",
    ]
    assert [r.levelno for r in flower_output.records] == [logging.WARNING, logging.INFO]


def test_forwarded_lines_are_capped_and_named_after_the_client_id(flower_output):
    @forward_logs
    def chatty(msg: Message, context: Context) -> Message:
        for i in range(MAX_LINES + 50):
            logging.getLogger("fedprime_core.method.training").info("step %d", i)
        return Message(content=RecordDict(), reply_to=msg)

    reply = chatty(_message(), _context(**{"client-id": "hospital-a", "partition-id": 0}))
    record = reply.content.config_records[CLIENT_LOG]
    assert record["client"] == "hospital-a"
    assert len(record["lines"]) == MAX_LINES + 1
    assert record["lines"][-1].startswith("... 50 more line(s) not forwarded")
    assert chatty(_message(), _context()).content.config_records[CLIENT_LOG]["client"] == "node-7"


def test_a_site_can_keep_its_lines_at_home(flower_output):
    @forward_logs
    def handler(msg: Message, context: Context) -> Message:
        logging.getLogger("client_app.app").info("round %d: loss %.4f", 1, 2.0)
        return Message(content=RecordDict(), reply_to=msg)

    for off in (False, "false", "0"):
        reply = handler(_message(), _context(**{"partition-id": 0, "forward-logs": off}))
        assert CLIENT_LOG not in reply.content.config_records
    reply = handler(_message(), _context(**{"partition-id": 0, "forward-logs": True}))
    assert reply.content.config_records[CLIENT_LOG]["lines"] == ["round 1: loss 2.0000"]


def test_replies_without_or_with_malformed_client_lines_are_ignored(flower_output):
    msg = _message()
    log_client_lines(Message(content=RecordDict(), reply_to=msg))
    bad = Message(content=RecordDict({CLIENT_LOG: ConfigRecord({"client": "0", "lines": 5})}), reply_to=msg)
    log_client_lines(bad)
    assert not [m for m in flower_output.messages if m.startswith("client ")]


class SlowGrid(LoopbackGrid):
    """Clients that take their time (and then all fail to answer)."""

    def send_and_receive(self, messages, *, timeout=None):
        list(messages)
        time.sleep(1.0)
        return []


def test_waiting_for_replies_is_reported_while_it_lasts(flower_output):
    grid = ClientLogGrid(SlowGrid({}, 2), every=0.2)
    messages = [_message(1), _message(2)]
    assert grid.send_and_receive(messages, timeout=5) == []
    waiting = [m for m in flower_output.messages if m.startswith("waiting for")]
    assert waiting and all(m.startswith("waiting for 2 train replies, ") and m.endswith(" elapsed") for m in waiting)
    assert len(waiting) <= 5  # one line per interval, and none after the replies came
    flower_output.records.clear()
    assert list(ClientLogGrid(LoopbackGrid({}, 1), every=0.2).send_and_receive([])) == []
    assert not flower_output.messages  # a quick exchange says nothing


def test_the_strategys_own_wait_reports_waiting_too(flower_output):
    # The strategy polls the grid itself (so that it can stop when the SuperLink is gone)
    # rather than calling send_and_receive: it reports at the ClientLogGrid's pace.
    from fedprime_core.config import parse_run_config
    from server_app.transport import Transport

    transport = Transport(parse_run_config({}))
    grid = ClientLogGrid(LoopbackGrid({}, 2, offline=[2]), every=0.2)
    started = time.monotonic()
    replies = transport.exchange(grid, [_message(2)], timeout=1.0)
    assert replies == [] and 0.9 <= time.monotonic() - started < 3.0
    waiting = [m for m in flower_output.messages if m.startswith("waiting for")]
    assert waiting and all(m.startswith("waiting for 1 train repl(y/ies), ") for m in waiting) and len(waiting) <= 6


def test_a_run_logs_every_clients_round_and_keeps_the_strategys_result(
    quick_config, tiny_vilt, flower_output, federation
):
    cfg = quick_config(run_name="logs", fraction_evaluate=1.0)
    federation(cfg)  # the ServerApp wraps the loopback grid in a ClientLogGrid itself
    messages = flower_output.messages
    for client in (0, 1, 2):
        for server_round in (1, 2):
            assert any(m.startswith(f"client {client} | round {server_round}: loss ") for m in messages), client
    # Logged once by the server from the reply (here, in one process, the client's own console
    # line reaches the same handlers too, as the SuperNode's console would show it).
    relogged = [
        r for r in flower_output.records if r.name == "flwr" and r.getMessage().startswith("client 0 | round 1:")
    ]
    assert len(relogged) == 1
    own = [r for r in flower_output.records if r.name == "client_app.app" and "round 1: loss" in r.getMessage()]
    assert own and own[0].getMessage().startswith("client 0 | round 1: loss ")
    # What the clients sent is about their data, never the data: no sample's text in any line.
    from fedprime_core import runtime

    forwarded = " ".join(r.getMessage() for r in flower_output.records if r.name == "flwr")
    texts = {s.text for s in runtime.load_splits(cfg).train if len(s.text) > 20}
    assert texts and not any(text in forwarded for text in texts)
    run_dir = Path(cfg.results_dir) / "logs"
    checkpoint, _ = load_checkpoint(run_dir)
    with np.load(run_dir / "final.npz") as final:
        assert sorted(final.files) == sorted(checkpoint)
        assert all(np.array_equal(final[k], checkpoint[k]) for k in final.files)
    result = json.loads((run_dir / "result.json").read_text())
    assert sorted(result["train_metrics_clientapp"]) == ["1", "2"]
    assert result["train_metrics_clientapp"]["2"]["accepted"] == 3
    assert sorted(result["evaluate_metrics_serverapp"]) == ["1", "2"]
    assert 0.0 <= result["evaluate_metrics_serverapp"]["2"]["full-modal/accuracy"] <= 1.0
    assert sorted(result["evaluate_metrics_clientapp"]) == ["1", "2"]
