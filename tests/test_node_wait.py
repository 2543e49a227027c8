"""The ServerApp's wait for nodes is bounded by ``node-wait`` and names the clients it misses (issue 20).

The real ServerApp and ClientApp on the in-process loopback grid (tests/loopback.py); the
deployment test in tests/test_e2e_deployment.py checks the same with a SuperNode that never
starts under a real SuperLink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import pytest
from flwr.app import Context, RecordDict

from fedprime_core.config import config_to_dict
from fedprime_core.failures import RunFailed
from server_app.app import main as server_main
from server_app.nodes import NotEnoughNodesError, wait_for_nodes
from tests.loopback import LoopbackGrid, history
from tests.loopback import run_server as run


@pytest.fixture()
def logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


class Nodes:
    """A grid stand-in that only answers ``get_node_ids`` with a list that may change."""

    def __init__(self, *schedule: list[int]) -> None:
        self.schedule = list(schedule)

    def get_node_ids(self) -> Iterable[int]:
        return self.schedule.pop(0) if len(self.schedule) > 1 else self.schedule[0]


def test_a_node_that_never_connects_is_waited_for_node_wait_then_the_run_goes_on(quick_config, logs):
    """3 nodes wanted, 2 ever connect: after node-wait the rounds run on the two."""
    cfg = quick_config(
        run_name="two-of-three", min_available_nodes=3, min_train_nodes=2, node_wait=1.0, fraction_evaluate=0.0
    )
    started = time.monotonic()
    run(cfg, num_nodes=2)
    assert time.monotonic() - started < 120  # the default round-timeout (3600 s) would have held it for an hour
    assert [r["accepted"] for r in history(cfg) if r["round"] > 0] == [2, 2]
    assert "Waiting for nodes before round 1: 2 connected, 3 required (min-available-nodes)" in logs.text
    assert "waited 1s (node-wait) for 3 nodes (min-available-nodes) before round 1; going on with the 2" in logs.text


class LosesNode3AfterRound1(LoopbackGrid):
    """Node 3 (partition 2) goes down for good once it has answered round 1."""

    def get_node_ids(self) -> Iterable[int]:
        trained = [m for m in self.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == 3]
        return [1, 2] if trained else [1, 2, 3]


def test_a_site_that_goes_down_is_named_and_the_federation_carries_on(quick_config, logs):
    cfg = quick_config(
        run_name="site-down",
        num_server_rounds=3,
        min_available_nodes=3,
        min_train_nodes=2,
        node_wait=1.0,
        fraction_evaluate=0.0,
    )
    grid = LosesNode3AfterRound1(config_to_dict(cfg), 3)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config_to_dict(cfg)))
    assert [r["accepted"] for r in history(cfg) if r["round"] > 0] == [3, 2, 2]
    assert "before round 2: 2 connected, 3 required" in logs.text
    assert "going on with the 2 connected (min-train-nodes is 2); not connected: client 2 (node 3)" in logs.text


def test_wait_for_nodes_returns_as_soon_as_enough_connect_and_fails_below_min_train_nodes():
    assert wait_for_nodes(Nodes([1], [1, 2], [1, 2, 3]), needed=3, enough=2, node_wait=60, poll=0.01) == [1, 2, 3]
    with pytest.raises(NotEnoughNodesError, match=r"not connected: client b \(node 2\)\. Start the missing"):
        wait_for_nodes(Nodes([1]), needed=3, enough=2, node_wait=0.05, known={1: "a", 2: "b"}, poll=0.01)
    # A client whose SuperNode came back under a new node id is not missing.
    assert wait_for_nodes(Nodes([1, 5]), needed=3, enough=2, node_wait=0.05, known={2: "b", 5: "b"}, poll=0.01) == [
        1,
        5,
    ]


def test_the_wait_stops_when_the_superlink_is_lost():
    def lost() -> None:
        raise RunFailed("the SuperLink is gone")

    with pytest.raises(RunFailed, match="the SuperLink is gone"):
        wait_for_nodes(Nodes([1]), needed=2, enough=1, node_wait=60, check=lost, poll=0.01)
