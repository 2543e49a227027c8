"""A round's client-side evaluation travels with the next round's training: one message cycle per round.

The state a round leaves is exactly what the next round's train messages carry, so a client
that trains next evaluates it first, as received (``evaluate-first``), and returns the metrics
in its train reply; a client sampled to evaluate but not to train gets its evaluate message in
the same exchange. Only the last round evaluates in a cycle of its own. These tests hold the
folded evaluation to the separate one: same numbers, same clients, same rejections, and a
resume that loses none of it.
"""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from fedprime_core.config import config_to_dict
from fedprime_protocol.messages import EVALUATE_FIRST, EVALUATION
from tests.loopback import LoopbackGrid, history, kill_the_server_in_round, run_dir_of
from tests.loopback import run_server as run

SETTINGS = dict(fraction_evaluate=1.0, server_eval=False, client_test_samples=24, eval_every=1)


def scores(record: dict) -> dict[str, dict[str, float]]:
    """Each client's client-side metrics of a round, without the timing."""
    return {
        client: {k: v for k, v in metrics.items() if not k.endswith("-seconds")}
        for client, metrics in record["client-eval-per-client"].items()
    }


def same_scores(a: dict, b: dict) -> bool:
    """Equal counts and accuracies; losses equal up to float32 noise (a state that differs in its last bits)."""
    assert scores(a).keys() == scores(b).keys()
    for client, metrics in scores(a).items():
        other = scores(b)[client]
        assert metrics.keys() == other.keys()
        for name, value in metrics.items():
            assert value == (pytest.approx(other[name], rel=1e-5) if "loss" in name else other[name]), (client, name)
    return True


def rounds(cfg) -> dict[int, dict]:
    """The run's records by round (metrics.json)."""
    return {r["round"]: r for r in history(cfg)}


def by_round(grid: LoopbackGrid, kind: str) -> dict[int, list[Message]]:
    """The messages of ``kind`` the server sent, by their ``server-round``."""
    out: dict[int, list[Message]] = {}
    for message in grid.sent:
        if message.metadata.message_type == kind:
            out.setdefault(int(message.content["config"]["server-round"]), []).append(message)
    return out


def test_a_rounds_evaluation_rides_on_the_next_training_and_equals_a_separate_one(quick_config):
    cfg = quick_config(run_name="folded", num_server_rounds=3, **SETTINGS)
    grid = run(cfg)
    train, evaluate = by_round(grid, MessageType.TRAIN), by_round(grid, MessageType.EVALUATE)
    # Rounds 1 and 2 were evaluated inside rounds 2 and 3's train messages; only round 3 in a cycle of its own.
    assert sorted(evaluate) == [3] and len(evaluate[3]) == 3
    assert [m.content["config"].get(EVALUATE_FIRST) for m in train[1]] == [None] * 3
    assert [m.content["config"].get(EVALUATE_FIRST) for m in train[2]] == [1] * 3
    assert [m.content["config"].get(EVALUATE_FIRST) for m in train[3]] == [2] * 3
    records = rounds(cfg)
    for rnd in (1, 2, 3):
        record = records[rnd]
        assert "client-eval-pending" not in record
        assert sorted(record["client-eval-per-client"]) == ["0", "1", "2"], rnd
        assert record["client-eval"]["num-examples"] > 0
    assert records[1]["client-eval-in-round"] == 2 and records[2]["client-eval-in-round"] == 3
    assert "client-eval-in-round" not in records[3]
    assert records[1]["bytes-sent-evaluate"] == 0  # every evaluator trained next: nothing sent twice
    # The evaluation of round 1's state is the one a separate cycle gives (a 1-round run evaluates it on its own).
    alone = quick_config(run_name="alone", num_server_rounds=1, **SETTINGS)
    grid_alone = run(alone)
    assert sorted(by_round(grid_alone, MessageType.EVALUATE)) == [1]
    assert same_scores(rounds(alone)[1], records[1])


def test_clients_that_do_not_train_next_get_their_evaluate_message_in_the_same_exchange(quick_config):
    cfg = quick_config(run_name="half", num_server_rounds=2, fraction_train=0.5, min_train_nodes=2, **SETTINGS)
    grid = run(cfg, num_nodes=4)
    train, evaluate = by_round(grid, MessageType.TRAIN), by_round(grid, MessageType.EVALUATE)
    trainers = {m.metadata.dst_node_id for m in train[2]}
    assert len(trainers) == 2
    assert all(m.content["config"].get(EVALUATE_FIRST) == 1 for m in train[2])
    separate = {m.metadata.dst_node_id for m in evaluate[1]}
    assert separate == {1, 2, 3, 4} - trainers  # the two that did not train in round 2
    # ... and in the same exchange: they were pushed between round 2's train messages and their replies.
    order = [m.metadata.message_id for m in grid.sent]
    last_train = max(order.index(m.metadata.message_id) for m in train[2])
    assert all(order.index(m.metadata.message_id) < last_train + 3 for m in evaluate[1])
    record = rounds(cfg)[1]
    assert sorted(record["client-eval-per-client"]) == ["0", "1", "2", "3"]
    assert record["bytes-sent-evaluate"] == sum(int(m.content["arrays"].count_bytes()) for m in evaluate[1])


class BadCarriedEvaluations(LoopbackGrid):
    """In train replies that carry an evaluation: node 2's has a NaN, node 3's has none; training is fine."""

    def _deliver(self, message, node):
        reply = super()._deliver(message, node)
        carrying = message.metadata.message_type == MessageType.TRAIN and EVALUATION in reply.content.metric_records
        if not carrying or node not in (2, 3):
            return reply
        if node == 2:
            reply.content[EVALUATION] = MetricRecord({**dict(reply.content[EVALUATION]), "accuracy": float("nan")})
        else:
            del reply.content[EVALUATION]
        return reply


def test_a_bad_carried_evaluation_is_rejected_alone_and_the_training_counts(quick_config, caplog):
    from server_app.app import main as server_main

    caplog.set_level(logging.WARNING, logger="flwr")
    cfg = quick_config(run_name="bad-carried", num_server_rounds=2, **SETTINGS)
    run_config = config_to_dict(cfg)
    grid = BadCarriedEvaluations(run_config, 3)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    records = rounds(cfg)
    assert records[2]["accepted"] == 3 and records[2]["rejected"] == 0  # every node's training counted
    assert sorted(records[1]["client-eval-per-client"]) == ["0"]
    assert "rejected evaluate reply from node 2: metrics field 'accuracy' must be a finite number" in caplog.text
    assert "rejected evaluate reply from node 3: reply has no 'evaluation' MetricRecord" in caplog.text
    assert sorted(records[2]["client-eval-per-client"]) == ["0", "1", "2"]  # the last round's own cycle


@pytest.mark.slow  # four short runs
def test_a_resume_after_a_kill_in_the_carrying_round_still_evaluates_the_round_before(quick_config, monkeypatch):
    settings = dict(num_server_rounds=2, **SETTINGS)
    cfg = quick_config(run_name="killed", **settings)
    folder = run_dir_of(cfg)
    revive = kill_the_server_in_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    saved = rounds(cfg)
    assert saved[1]["client-eval-pending"] is True and "client-eval" not in saved[1]
    revive()
    grid = run(quick_config(run_name="ignored", resume=str(folder), **settings))
    assert {m.content["config"].get(EVALUATE_FIRST) for m in by_round(grid, MessageType.TRAIN)[2]} == {1}
    records = rounds(cfg)
    assert "client-eval-pending" not in records[1] and records[1]["client-eval-in-round"] == 2
    reference = quick_config(run_name="uninterrupted", **settings)
    run(reference)
    assert same_scores(records[1], rounds(reference)[1])
    assert same_scores(records[2], rounds(reference)[2])


def test_a_client_whose_evaluation_fails_still_trains_and_says_why(quick_config, monkeypatch, caplog):
    from fedprime_core.site_worker import LocalSite

    evaluate = LocalSite.evaluate

    def out_of_memory_on_client_1(self, setup, state):
        if setup.node.client_id == "1":
            raise RuntimeError("out of memory")
        return evaluate(self, setup, state)

    monkeypatch.setattr(LocalSite, "evaluate", out_of_memory_on_client_1)
    caplog.set_level(logging.WARNING, logger="flwr")
    cfg = quick_config(run_name="eval-fails", num_server_rounds=2, **SETTINGS)
    run(cfg)
    records = rounds(cfg)
    assert records[2]["accepted"] == 3  # its training counted although the evaluation before it failed
    assert sorted(records[1]["client-eval-per-client"]) == ["0", "2"]
    expected = "rejected evaluate reply from node 2: the client's evaluation failed: RuntimeError: out of memory"
    assert expected in caplog.text
