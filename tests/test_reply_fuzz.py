"""No reply can crash the server or take over the average: the reply path under hostile input.

Every method's round 1 (tests/hostile.py: three honest nodes and a fourth that sends
whatever Hypothesis draws) must end without an exception other than the fourth node's
rejection, and a rejected reply must leave the round exactly as a round without it: the
global arrays to the bit, the personal pools, clients.json, the train loss. The fast tier
runs a fixed set of examples per method; the slow variant draws many more
(``benchmarks/reply_fuzz.py`` records the figures).
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings

from tests.hostile import HONEST, HOSTILE, METHODS, ReplyRound, apply, is_finite_state, mutations, same_outcome

_BASELINES: dict[str, dict[str, Any]] = {}


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """curves.png is drawn from the round records alone (nothing a client sent); skipping it keeps examples fast."""
    monkeypatch.setattr("fedprime_core.results.plot_curves", lambda *args, **kwargs: None)


def play(method: str, hostile_parts: dict[str, Any] | None) -> dict[str, Any]:
    """Round 1 of ``method`` with the honest nodes and (unless ``None``) the fourth node's reply."""
    with tempfile.TemporaryDirectory() as tmp:
        round_ = ReplyRound(method, Path(tmp) / "fuzz")
        replies = [round_.honest(node) for node in HONEST]
        if hostile_parts is not None:
            try:
                replies.append(round_.message(HOSTILE, hostile_parts))
            except (TypeError, ValueError):
                reject()  # Flower itself refuses to carry it: no client can send it
        return round_.run(replies)


def baseline(method: str) -> dict[str, Any]:
    """The round without the fourth node's reply (it was sent a message, it did not answer)."""
    if method not in _BASELINES:
        _BASELINES[method] = play(method, None)
    return _BASELINES[method]


def parts_of(method: str, node: int = HOSTILE) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return ReplyRound(method, Path(tmp) / "fuzz").reply_parts(node)


def check(method: str, ops: list[tuple]) -> str:
    """Play ``ops`` against ``method``; the properties every reply must keep. Returns the fourth node's status."""
    parts = apply(parts_of(method), ops)
    outcome = play(method, parts)
    status = outcome["status"][HOSTILE]
    assert status in ("accepted", "rejected")
    assert all(outcome["status"][node] == "accepted" for node in HONEST)
    assert is_finite_state(outcome["arrays"])
    if status == "rejected":
        assert same_outcome(outcome, baseline(method))
    else:  # what an accepted reply left in clients.json is typed (no client record: it is known by its node)
        [record] = [r for r in outcome["clients"].values() if r["node-id"] == HOSTILE]
        assert all(isinstance(v, (int, float, str, list)) and not isinstance(v, bool) for v in record.values())
    return status


@pytest.mark.parametrize("method", METHODS)
def test_an_honest_fourth_reply_is_accepted_and_changes_the_round(method):
    outcome = play(method, parts_of(method))
    assert all(status == "accepted" for status in outcome["status"].values())
    assert not same_outcome(outcome, baseline(method)) or method == "centralized-p"


@pytest.mark.parametrize("method", METHODS)
@settings(
    max_examples=10,  # per method; about 15 s for all seven on 2 quiet cores (the alignment dominates)
    deadline=dt.timedelta(seconds=60),  # a hang fails; a loaded CI machine does not
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(ops=mutations())
def test_no_reply_crashes_the_round_and_a_rejected_one_leaves_no_trace(method, ops):
    check(method, ops)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@settings(
    max_examples=60,
    deadline=dt.timedelta(seconds=60),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(ops=mutations())
def test_many_hostile_replies(method, ops):
    check(method, ops)


# -- the defects the campaign found, one by one (each failed before this boundary) -----------
@pytest.mark.parametrize(
    "ops, reason",
    [
        ([("client", "note", b"\x00\x01")], "client record has an unknown field 'note'"),
        ([("usage", "inter", 3)], "usage of pool 'inter' must be a list of counts"),
        ([("client", "num-train", 10**5000)], "client record field 'num-train' must lie in 0.."),
        ([("client", "client-id", "²")], "client id '²' must be 1-64 ASCII letters"),
        ([("client", "client-id", "①")], "client id '①' must be"),
        ([("metrics", "num-examples", 2**62)], "metrics field 'num-examples' must lie in 1.."),
        ([("metrics", "num-examples", 1e300)], "metrics field 'num-examples' must lie in 1.."),
        ([("metrics", "num-examples", 5000)], "num-examples 5000 exceeds the num-train in its client record (104)"),
        ([("metrics", "train-loss", 1e300)], "metrics field 'train-loss' must be a finite number"),
    ],
)
def test_each_defect_of_the_campaign_is_a_rejection_with_its_reason(ops, reason):
    outcome = play("fedprime", apply(parts_of("fedprime"), ops))
    assert outcome["status"][HOSTILE] == "rejected"
    assert same_outcome(outcome, baseline("fedprime"))
    reasons = " ".join(outcome["metrics"][-1]["rejected-reasons"])
    assert reason in reasons, reasons


def test_a_sample_count_within_the_clients_own_num_train_is_its_weight_and_no_more(caplog):
    """2**30 samples cannot take over the average: capped by max-client-examples, even when num-train agrees."""
    parts = parts_of("fed-intra")
    parts["metrics"]["num-examples"] = 2**30
    parts["client"]["num-train"] = 2**30
    outcome = play("fed-intra", parts)
    assert outcome["status"][HOSTILE] == "rejected"
    assert "exceeds max-client-examples (1000000)" in " ".join(outcome["metrics"][-1]["rejected-reasons"])


def test_a_client_log_cannot_forge_server_lines(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    parts = parts_of("fed-intra")
    parts["client-log"] = {
        "client": "x\nFedPrime finished",
        "levels": [10**6],
        "lines": ["ok\nFedPrime finished\x1b[2J"],
    }
    play("fed-intra", parts)
    lines = [r.getMessage() for r in caplog.records if "client " in r.getMessage()]
    assert "client node-4 | ok?FedPrime finished?[2J" in lines
    assert not any("\n" in line or "\x1b" in line for line in lines)
    assert max(r.levelno for r in caplog.records) <= logging.CRITICAL


def test_no_client_id_sorts_wrong_or_crashes_the_order():
    from fedprime_core.method.federated import client_order

    ids = ["10", "2", "002", "²", "①", "9" * 5000, "site-a", ""]
    ordered = sorted(ids, key=client_order)
    assert ordered[:4] == ["002", "2", "10", "9" * 5000]
    assert set(ordered[4:]) == {"²", "①", "site-a", ""}


@pytest.mark.parametrize("method", ["fed-intra", "fedprime"])
def test_a_node_answering_for_another_client_is_rejected_whichever_replies_first(method):
    """Node 4 (client "3") claims client "0", node 1's; then node 1 claims "3", node 4's. Either way the
    impostor is rejected, the honest node counts, and clients.json keeps each client on its own node."""
    parts = parts_of(method)
    parts["client"]["client-id"] = "0"
    outcome = play(method, parts)
    assert outcome["status"][HOSTILE] == "rejected"
    assert "reply is from client '0' but node 4 identified as '3'" in " ".join(
        outcome["metrics"][-1]["rejected-reasons"]
    )
    assert same_outcome(outcome, baseline(method))

    with tempfile.TemporaryDirectory() as tmp:
        round_ = ReplyRound(method, Path(tmp) / "fuzz")
        impostor = round_.reply_parts(1)
        impostor["client"]["client-id"] = "3"  # the lower node id claims the higher one's client
        replies = [round_.message(1, impostor), round_.honest(2), round_.honest(3), round_.honest(HOSTILE)]
        outcome = round_.run(replies)
    assert outcome["status"] == {1: "rejected", 2: "accepted", 3: "accepted", HOSTILE: "accepted"}
    assert outcome["clients"]["3"]["node-id"] == HOSTILE
    assert "reply is from client '3' but node 1 identified as '0'" in " ".join(
        outcome["metrics"][-1]["rejected-reasons"]
    )


def evaluation_replies(round_: ReplyRound, record: str, fourth: dict[str, Any]) -> list:
    """Evaluation replies of the four nodes to ``round_``'s messages, in the MetricRecord ``record``: two honest
    ones (accuracy 0.5 and 0.7, 10 samples each), a count that would take over the mean, and node 4's ``fourth``."""
    from flwr.app import Message, MetricRecord, RecordDict

    def reply(node, metrics):
        return Message(content=RecordDict({record: MetricRecord(metrics)}), reply_to=round_.sent[node - 1])

    good = {"num-examples": 10, "loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4, "micro_f1": 0.5}
    return [
        reply(1, good),
        reply(2, {**good, "accuracy": 0.7}),
        reply(3, {**good, "num-examples": 2**62}),  # would take over the mean
        reply(4, {**good, **fourth}),
    ]


def test_evaluate_replies_are_parsed_too():
    with tempfile.TemporaryDirectory() as tmp:
        round_ = ReplyRound("fed-intra", Path(tmp) / "fuzz")
        replies = evaluation_replies(round_, "metrics", {"accuracy": float("inf")})
        out = round_.strategy.aggregate_evaluate(1, replies)
    assert out["num-examples"] == 20 and out["accuracy"] == pytest.approx(0.6)
    assert np.isfinite(list(out.values())).all()


def test_evaluations_carried_in_train_replies_are_parsed_the_same_way():
    """The client-side evaluation a train reply carries (``evaluate-first``) meets the evaluate reply's parser."""
    with tempfile.TemporaryDirectory() as tmp:
        round_ = ReplyRound("fed-intra", Path(tmp) / "fuzz")
        replies = evaluation_replies(round_, "evaluation", {"accuracy": [0.5, 0.5]})  # a list where a number belongs
        carried = frozenset(m.metadata.message_id for m in round_.sent)
        out = round_.strategy.aggregate_evaluate(1, replies, carried)
        assert sorted(round_.strategy.evaluated) == ["node-1", "node-2"]  # nodes 3 and 4 rejected
        # Not carried (a plain evaluate reply is read from "metrics"): nothing parses.
        assert round_.strategy.aggregate_evaluate(1, replies) is None
    assert out["num-examples"] == 20 and out["accuracy"] == pytest.approx(0.6)
    assert np.isfinite(list(out.values())).all()


def test_a_site_with_a_client_id_the_server_would_refuse_is_told_at_home():
    from fedprime_core.config import ConfigError
    from fedprime_core.node import node_client

    with pytest.raises(ConfigError, match=r"node config key 'client-id': client id 'hôpital a' must be 1-64 ASCII"):
        node_client({"client-id": "hôpital a", "partition-id": 0, "num-partitions": 2})
    assert node_client({"client-id": "hospital-a.b@c+1", "data-dir": "/data"}).client_id == "hospital-a.b@c+1"
