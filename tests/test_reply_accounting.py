"""Reply accounting: every node sent to ends up accepted, rejected or timed out, in client order, with its reason.

Uses the server's side of one round from tests/hostile.py (three honest nodes and a fourth),
calling the accounting directly; tests/test_reply_fuzz.py feeds the same round hostile replies.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from server_app.transport import Dispatch
from tests.hostile import HONEST, HOSTILE, ReplyRound


@pytest.fixture()
def round_(tmp_path: Path) -> ReplyRound:
    return ReplyRound("fedprime", tmp_path / "fuzz")  # personal pools: the server knows each node's client


def _statuses(tally):
    return [(o.node, o.client, o.status) for o in tally.outcomes]


def test_outcomes_and_updates_come_in_client_order_whatever_the_arrival_order(round_):
    accounting, sent = round_.strategy.replies, round_.strategy.train_sent
    replies = [round_.honest(node) for node in HONEST]
    forward = accounting.train(1, replies, sent)
    backward = accounting.train(1, list(reversed(replies)), sent)
    assert (
        _statuses(forward)
        == _statuses(backward)
        == [
            (1, "0", "accepted"),
            (2, "1", "accepted"),
            (3, "2", "accepted"),
            (4, "3", "timed-out"),
        ]
    )
    assert [u.client_id for u in forward.updates] == [u.client_id for u in backward.updates] == ["0", "1", "2"]
    assert forward.rejected == 1 and forward.replies_with_arrays == 3 and forward.bytes_received > 0
    assert forward.outcomes[-1].reason == "no reply to the train message within round-timeout 3600s"


def test_second_replies_replies_from_elsewhere_and_errors_are_accounted_for(round_):
    accounting, strategy = round_.strategy.replies, round_.strategy
    sent = strategy.train_sent
    only_three = Dispatch(messages=sent.messages[:3], clients=dict(list(sent.clients.items())[:3]), arrays=sent.arrays)
    error = Message(Error(code=1, reason="[data] DataError: train.jsonl line 3"), reply_to=round_.sent[2])
    replies = [round_.honest(1), round_.honest(1), round_.honest(2), error, round_.honest(HOSTILE)]
    tally = accounting.train(1, replies, only_three)
    assert _statuses(tally) == [(1, "0", "accepted"), (2, "1", "accepted"), (3, "2", "rejected")]
    assert tally.outcomes[-1].reason == "client error: DataError: train.jsonl line 3"
    assert tally.outcomes[-1].kind == "data"
    assert len(tally.updates) == 2  # node 1 counted once; node 4 was not sent this round


def test_a_client_that_trained_and_then_went_silent_is_lost_at_that_round(round_):
    accounting, sent = round_.strategy.replies, round_.strategy.train_sent
    accounting.train(1, [round_.honest(node) for node in HONEST], sent)
    clients = round_.strategy.clients
    assert clients["0"]["state"] == "training" and clients["0"]["last-round"] == 1
    accounting.train(2, [round_.honest(2), round_.honest(3)], sent)
    assert clients["0"]["state"] == "lost" and clients["0"]["lost-round"] == 2
    assert clients["0"]["reason"].startswith("no reply to the train message")
    accounting.train(3, [round_.honest(2)], sent)
    assert clients["0"]["lost-round"] == 2  # lost when it first went away
    assert clients["1"]["state"] == "training" and clients["1"]["last-round"] == 3


def test_evaluate_replies_are_kept_per_client_in_client_order_and_named_safely(round_):
    accounting, sent = round_.strategy.replies, round_.strategy.train_sent
    good = {"num-examples": 10, "loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4, "micro_f1": 0.5}

    def reply(node, metrics, claimed=None):
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if claimed is not None:
            content["client"] = ConfigRecord({"client-id": claimed})
        return Message(content=content, reply_to=round_.sent[node - 1])

    unknown = Dispatch(messages=sent.messages, clients={}, arrays=sent.arrays)
    replies = [
        reply(3, good, "site-c"),
        reply(1, good, "bad id!"),
        reply(2, {**good, "accuracy": float("inf")}),  # does not parse: left out
        reply(4, good, "site-c"),
        reply(3, {**good, "accuracy": 0.9}, "site-c"),  # a second reply of node 3: ignored
    ]
    per_client = accounting.evaluate(1, replies, unknown)
    assert list(per_client) == ["node-1", "site-c", "site-c (node 4)"]
    assert per_client["site-c"]["accuracy"] == 0.5
    known = accounting.evaluate(1, [reply(1, good, "somebody-else")], sent)
    assert list(known) == ["0"]  # the client the server knows the node as


def test_a_sites_checked_counts_bound_what_its_train_and_evaluate_replies_claim(round_):
    """A site whose data check found 50 training, 10 validation and 30 test samples cannot claim more later
    (its train reply's own client record says 104: a reply's record is not what bounds it)."""
    accounting, sent = round_.strategy.replies, round_.strategy.train_sent
    round_.strategy.identities.node_records[4] = {"client-id": "3", "num-train": 50, "num-val": 10, "num-test": 30}
    tally = accounting.train(1, [round_.honest(node) for node in (*HONEST, HOSTILE)], sent)
    assert _statuses(tally)[-1] == (4, "3", "rejected")
    reason = "num-examples 94 exceeds the num-train it reported when it identified itself (50)"
    assert tally.outcomes[-1].reason == reason

    def evaluation(node, **counts):
        metrics = {"num-examples": 10, "loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4, "micro_f1": 0.5}
        metrics.update({"test-num-examples": 30, "test-loss": 1.0, "test-accuracy": 0.9, **counts})
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=round_.sent[node - 1])

    assert list(accounting.evaluate(1, [evaluation(1), evaluation(4)], sent)) == ["0", "3"]  # at the bounds
    for counts in ({"num-examples": 11}, {"test-num-examples": 31}):
        assert list(accounting.evaluate(1, [evaluation(1, **counts), evaluation(4, **counts)], sent)) == ["0"]


@pytest.mark.parametrize(
    "method", ["fedprime", "fed-inter", "fed-intra", "fedavg-p", "pfpt", "fedprox-p", "centralized-p"]
)
def test_every_methods_honest_replies_pass_every_check(quick_config, method):
    """The real ClientApp's replies, two local epochs at kappa 3 (usage counts exactly at their bound), two
    rounds with client-side evaluation: none is refused, so the reply checks cost an honest federation nothing."""
    from flwr.app import Context

    from fedprime_core.config import config_to_dict
    from server_app.app import main as server_main
    from tests.loopback import LoopbackGrid, history

    cfg = quick_config(
        method=method,
        run_name=method,
        num_server_rounds=2,
        local_epochs=2,
        kappa=3,
        fraction_evaluate=1.0,
        client_test_samples=20,
        max_train_samples=120,
        max_test_samples=24,
        server_eval=False,
    )
    run_config = config_to_dict(cfg)
    server_main(LoopbackGrid(run_config, 3), Context(1, 0, {}, RecordDict(), run_config))
    rounds = [r for r in history(cfg) if r["round"] >= 1]
    owners = 1 if method == "centralized-p" else 3
    assert [(r["accepted"], r["rejected"]) for r in rounds] == [(owners, 0)] * 2, [
        r["rejected-reasons"] for r in rounds
    ]
    assert len(rounds[-1]["client-eval-per-client"]) == owners
