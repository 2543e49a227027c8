"""A ClientApp reads its run config and node config once per message and passes the result down."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedprime_core import config as config_module
from fedprime_core import node as node_module
from fedprime_core.config import ConfigError
from fedprime_core.node import node_config, node_setup
from fedprime_core.site_worker import TrainOutcome
from fedprime_protocol.messages import instruction_content
from tests.loopback import LoopbackGrid

SITE = {"dataset": "food101", "classes": "a,b", "device": "cpu"}


@pytest.fixture()
def parses(monkeypatch):
    """How often a run config is validated (``parse_run_config``, directly or through ``replace``)."""
    calls = []
    parse = config_module.parse_run_config

    def counted(*args, **kwargs):
        calls.append(1)
        return parse(*args, **kwargs)

    monkeypatch.setattr(config_module, "parse_run_config", counted)
    monkeypatch.setattr(node_module, "parse_run_config", counted)
    return calls


def test_the_nodes_view_is_made_once_and_applying_it_again_changes_nothing(parses):
    setup = node_setup(SITE, {"data-dir": "/sites/a", "client-id": "a", "data-layout": "jsonl"}, 4)
    assert len(parses) == 1 and setup.node.client_id == "a" and setup.node_id == 4
    cfg = setup.cfg
    assert (cfg.data_dir, cfg.data_layout, cfg.device) == ("/sites/a", "jsonl", "cpu")
    assert setup.run_cfg.data_dir == "" and len(parses) == 2  # the node's view: one more validation
    assert setup.cfg is cfg and node_config(setup.node, cfg) is cfg and len(parses) == 2  # and never again
    partition = node_setup({}, {"partition-id": 1, "num-partitions": 3})
    assert partition.cfg is partition.run_cfg and partition.node.seed_key == 2


def test_a_site_whose_data_cannot_go_with_the_run_is_told_where_the_work_is_done():
    setup = node_setup({}, {"data-dir": "/sites/a"}, 7)  # dataset="embedded" has no folders
    assert setup.node.client_id == "node-7"  # it can still say who it is
    with pytest.raises(ConfigError, match="needs a dataset read from disk"):
        _ = setup.cfg
    with pytest.raises(ConfigError, match="must be an absolute path"):
        node_setup({}, {"data-dir": "relative/a"})


def test_each_handler_reads_the_configs_once_and_hands_the_site_what_it_read(monkeypatch, parses):
    import client_app.app as client_app

    seen = []

    class Site:
        def train(self, setup, state, server_round):
            seen.append(setup)
            trained = {k: v + 1 for k, v in state.items()}
            metrics = {"num-examples": 5, "train-loss": 0.5, "train-seconds": 0.1, "steps": 1}
            return TrainOutcome(trained, metrics, {}, {}, setup.node.describe())

        def evaluate(self, setup, state):
            seen.append(setup)
            return {"num-examples": 5, "accuracy": 0.5}, setup.node.describe()

    monkeypatch.setattr(client_app, "site_for", lambda node_config, run_id: Site())
    LoopbackGrid({}, 1)  # the task identity messages need outside a Flower process
    node_config = {"partition-id": 0, "num-partitions": 2}
    context = Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(), run_config={"tau": 6})
    content = instruction_content({"head": np.zeros(3, np.float32)}, ConfigRecord({"server-round": 2}))
    for handler, kind in ((client_app.train, MessageType.TRAIN), (client_app.evaluate, MessageType.EVALUATE)):
        parses.clear()
        reply = handler(Message(content=content, message_type=kind, dst_node_id=3), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert len(parses) == 1, handler.__name__
    assert [s.node.client_id for s in seen] == ["0", "0"] and seen[0].run_cfg.tau == 6
