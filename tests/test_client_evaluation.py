"""Evaluation of what clients use: each client's own test set (its labels, its missing mixture), client-side
evaluation per client and as a weighted mean, and the server's evaluation with the tau most popular centres."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict

from fedprime_core.data import shards
from fedprime_core.data.records import DatasetSplits, Sample, primary_labels
from fedprime_core.method.federated import GlobalState
from fedprime_core.method.interpool import InterPool
from fedprime_core.method.methods import method_spec
from fedprime_core.metrics import weighted_means
from fedprime_core.node import ClientNode, node_config
from fedprime_core.run_settings import shard_settings
from fedprime_protocol.messages import evaluate_reply_content
from tests.loopback import LoopbackGrid, history, run_dir_of

CLASSES = tuple(f"c{i}" for i in range(4))


def planted_splits(per_class_test: int = 100, train_labels: list[int] | None = None) -> DatasetSplits:
    """Complete rows (text and image features); test: ``per_class_test`` rows of each of 4 classes."""

    def row(split: str, i: int, label: int) -> Sample:
        return Sample(f"text {i}", None, label, uid=f"{split}:{i}", image_features=np.zeros(2, dtype=np.float32))

    train_labels = train_labels if train_labels is not None else [i % 4 for i in range(480)]
    test = [row("test", i, i % 4) for i in range(4 * per_class_test)]
    train = [row("train", i, label) for i, label in enumerate(train_labels)]
    dev = [row("dev", i, i % 4) for i in range(40)]
    return DatasetSplits(train, dev, test, CLASSES, False, 8, "embedded")


def test_label_matched_rows_follow_the_proportions_and_shrink_to_keep_them():
    labels = np.repeat(np.arange(4), 100)
    rng = np.random.default_rng(0)
    rows = shards.label_matched_rows(labels, np.array([6, 2, 0, 2]), 50, rng)
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=4), [30, 10, 0, 10])
    assert len(set(rows.tolist())) == 50  # without replacement
    # 90% of one class and only 100 rows of it: 111 rows keep the proportions (100 + 11), not 200.
    rows = shards.label_matched_rows(labels, np.array([9, 1, 0, 0]), 200, rng)
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=4), [100, 11, 0, 0])
    assert shards.label_matched_rows(labels, np.zeros(4), 10, rng).size == 0


def test_a_clients_test_set_has_its_label_proportions_and_missing_mixture_and_is_its_own(quick_config):
    """Skewed label partitions (Dirichlet alpha 0.05: a few classes each, unevenly) and per-client mixtures."""
    cfg = shard_settings(quick_config(label_alpha=0.05, client_test_samples=120, min_partition_size=20, seed=3))
    splits = planted_splits(per_class_test=200)  # enough rows of every class for any client's 120
    train, _ = shards.train_and_server_val(cfg, splits)
    partitions = shards.partition_train(cfg, train, 3)
    mixtures = shards.client_mixture_table(cfg, 3)
    built = [shards.partition_shard(cfg, splits, None, pid, 3, str(pid)) for pid in range(3)]
    for pid, shard in enumerate(built):
        proportions = np.bincount(primary_labels([train[i] for i in partitions[pid]]), minlength=4)
        proportions = proportions / proportions.sum()
        test_labels = primary_labels(shard.test.samples)
        assert len(test_labels) == 120
        # Each class within one row of its share of the client's training partition.
        assert np.all(np.abs(np.bincount(test_labels, minlength=4) - 120 * proportions) <= 1), pid
        # The client's own missing mixture, realised exactly (up to rounding) on its test rows.
        realised = np.bincount(shard.test.patterns, minlength=3)
        assert np.all(np.abs(realised - 120 * mixtures[pid]) <= 1.5), (pid, realised, mixtures[pid])
        assert {s.uid.split(":")[0] for s in shard.test.samples} == {"test"}
    assert len({tuple(np.bincount(primary_labels(s.test.samples), minlength=4)) for s in built}) == 3
    # Clients with the same label proportions (IID labels) still draw their own rows.
    iid = shard_settings(quick_config(client_test_samples=120, seed=3, max_train_samples=0))  # 40 rows per class each
    drawn = [shards.partition_shard(iid, splits, None, pid, 3, str(pid)).test.samples for pid in range(3)]
    assert len({tuple(np.bincount(primary_labels(rows), minlength=4)) for rows in drawn}) == 1
    assert len({frozenset(s.uid for s in rows) for rows in drawn}) == 3
    # A pure function of the seed: the same rows and patterns again; another seed, other rows.
    again = shards.partition_shard(cfg, splits, None, 1, 3, "1")
    assert [s.uid for s in again.test.samples] == [s.uid for s in built[1].test.samples]
    np.testing.assert_array_equal(again.test.patterns, built[1].test.patterns)
    other = shards.partition_shard(
        shard_settings(quick_config(label_alpha=0.05, client_test_samples=120, seed=4)), splits, None, 1, 3, "1"
    )
    assert [s.uid for s in other.test.samples] != [s.uid for s in built[1].test.samples]
    # client-test-samples = 0: no test set.
    assert (
        shards.partition_shard(shard_settings(quick_config(client_test_samples=0)), splits, None, 0, 3, "0").test
        is None
    )


def test_a_sites_test_set_is_its_own_test_split_with_its_mixture(quick_config, tmp_path):
    cfg = quick_config(dataset="food101", data_dir=str(tmp_path), client_test_samples=50, missing_alpha=0.0)
    splits = planted_splits(per_class_test=20)
    node = ClientNode(client_id="hospital-a", data_dir=str(tmp_path))
    shard = shards.site_shard(shard_settings(node_config(node, cfg)), splits, None, node)
    assert len(shard.test) == 50 and {s.uid for s in shard.test.samples} <= {s.uid for s in splits.test}
    np.testing.assert_allclose(np.bincount(shard.test.patterns, minlength=3) / 50, shard.mixture, atol=0.02)
    assert shard.describe()["num-test"] == 50
    without = DatasetSplits(splits.train, [], [], CLASSES, False, 8, "food101")
    assert shards.site_shard(shard_settings(node_config(node, cfg)), without, None, node).test is None


def test_weighted_means_weigh_validation_and_test_by_their_own_counts():
    rows = [
        {"accuracy": 0.5, "num-examples": 10, "test-accuracy": 0.2, "test-num-examples": 100},
        {"accuracy": 1.0, "num-examples": 30, "test-accuracy": 0.8, "test-num-examples": 50},
        {"accuracy": 0.0, "num-examples": 10},  # a site without a test split
    ]
    means = weighted_means(rows)
    assert means["accuracy"] == pytest.approx((5 + 30 + 0) / 50) and means["num-examples"] == 50
    assert means["test-accuracy"] == pytest.approx((20 + 40) / 150) and means["test-num-examples"] == 150


class FlakyEvaluators(LoopbackGrid):
    """Node 3 answers evaluate messages with an error, node 4 with a NaN metric; training works everywhere."""

    def _deliver(self, message, node):
        reply = super()._deliver(message, node)
        if message.metadata.message_type != MessageType.EVALUATE or node not in (3, 4):
            return reply
        if node == 3:
            return Message(Error(code=1, reason="RuntimeError: out of memory"), reply_to=message)
        metrics = dict(reply.content["metrics"])
        return Message(content=evaluate_reply_content({**metrics, "test-accuracy": float("nan")}), reply_to=message)


def test_client_side_evaluation_is_reported_per_client_and_as_the_weighted_mean(quick_config, caplog):
    from fedprime_core.config import config_to_dict
    from server_app.app import main as server_main

    caplog.set_level(logging.WARNING, logger="flwr")
    cfg = quick_config(
        run_name="clients", num_server_rounds=1, fraction_evaluate=1.0, client_test_samples=40, max_test_samples=24
    )
    run_config = config_to_dict(cfg)
    grid = FlakyEvaluators(run_config, 4)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    (record,) = history(cfg)[1:]
    assert record["accepted"] == 4  # all four trained
    per_client = record["client-eval-per-client"]
    assert sorted(per_client) == ["0", "1"]  # the two that could not evaluate are left out ...
    assert "node 3 did not evaluate: RuntimeError: out of memory" in caplog.text  # ... and logged
    assert "rejected evaluate reply from node 4: metrics field 'test-accuracy' must be a finite number" in caplog.text
    assert all(v["test-num-examples"] == 40 and v["num-examples"] > 0 for v in per_client.values())
    expected = weighted_means(list(per_client.values()))
    means = record["client-eval"]
    assert means["test-accuracy"] == pytest.approx(expected["test-accuracy"]) and means["test-num-examples"] == 80
    assert means["accuracy"] == pytest.approx(expected["accuracy"])
    assert means["num-examples"] == sum(v["num-examples"] for v in per_client.values())
    folder = run_dir_of(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final"]["clients-test"] == pytest.approx(means["test-accuracy"])
    assert summary["client-eval"]["per-client"].keys() == {"0", "1"}
    text = (folder / "summary.md").read_text()
    assert "clients' own test |" in text and f"| {100 * means['test-accuracy']:.2f} |" in text
    one = per_client["1"]
    assert f"| 1 | 40 | {100 * one['test-accuracy']:.2f} | {int(one['num-examples'])} |" in text
    columns = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"client-eval/test-accuracy", "client-eval-per-client/1/test-accuracy"} <= set(columns)


def planted_pool() -> InterPool:
    """Five centres, tau 3; popularity puts ids 4, 1 and 3 first (in that order)."""
    rng = np.random.default_rng(0)
    pool = InterPool.initial(rng.normal(size=(3, 1, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32))
    return InterPool(
        ids=np.array([0, 1, 2, 3, 4]),
        prompts=np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 4),
        keys=np.arange(5 * 4, dtype=np.float32).reshape(5, 4) + 100,
        popularity=np.array([0.1, 0.8, 0.2, 0.5, 0.9]),
        next_id=5,
        slots={},
        tau=pool.tau,
    )


def test_top_tau_arrays_hold_exactly_the_tau_most_popular_centres():
    spec = method_spec("fedprime")
    pool = planted_pool()
    state = {"pools.inter.prompts": pool.prompts, "pools.inter.keys": pool.keys, "head": np.ones(2, np.float32)}
    model = GlobalState(spec, state, pool)
    top = model.top_tau_arrays()
    np.testing.assert_array_equal(top["pools.inter.prompts"], pool.prompts[[4, 1, 3]])
    np.testing.assert_array_equal(top["pools.inter.keys"], pool.keys[[4, 1, 3]])
    np.testing.assert_array_equal(top["head"], state["head"])
    assert model.arrays["pools.inter.prompts"].shape[0] == 5  # the global state keeps every centre
    # A pool of tau centres, or a method without personal pools: the same model, nothing to evaluate again.
    small = GlobalState(spec, {**state, "pools.inter.prompts": pool.prompts[:3], "pools.inter.keys": pool.keys[:3]})
    assert small.top_tau_arrays() is None
    assert GlobalState(method_spec("fed-intra"), {"head": np.ones(2, np.float32)}).top_tau_arrays() is None


def test_the_server_evaluates_the_top_tau_centres_next_to_the_whole_pool(quick_config):
    from fedprime_core import runtime
    from fedprime_protocol.messages import state_to_record
    from server_app.strategy import FedPrimeStrategy

    cfg = quick_config(run_name="top-tau", num_server_rounds=0 + 1, fraction_evaluate=0.0, tau=3, kappa=2)
    run_dir_of(cfg).mkdir(parents=True)
    state = runtime.initial_state(cfg)
    pool = planted_pool()
    state = {
        **state,
        "pools.inter.prompts": np.repeat(pool.prompts[:, :, :1], state["pools.inter.prompts"].shape[2], 2),
    }
    state["pools.inter.keys"] = np.repeat(pool.keys[:, :1], state["pools.inter.keys"].shape[1], 1)
    strategy = FedPrimeStrategy(cfg, run_dir_of(cfg), state, inter_record=pool.to_record())
    seen = []

    def evaluate_held_out(server_round, global_state):
        seen.append((server_round, global_state["pools.inter.prompts"].copy()))
        size = global_state["pools.inter.prompts"].shape[0]
        return {"val": {"accuracy": size / 10, "num-examples": 8}}

    grid = LoopbackGrid({}, 3)
    strategy.start_or_resume(grid, state_to_record(state), num_rounds=0, evaluate_held_out=evaluate_held_out)
    (record,) = history(cfg)
    assert [r for r, _ in seen] == [0, 0]
    np.testing.assert_array_equal(seen[1][1], state["pools.inter.prompts"][[4, 1, 3]])  # the 3 most popular
    assert record["eval"]["val"]["accuracy"] == 0.5 and record["eval-top-tau"]["val"]["accuracy"] == 0.3
    assert record["eval-top-tau-same"] is False
