"""FedPrimeStrategy through the real ServerApp and ClientApp on an in-process grid: its hooks, what travels.

The resumable round loop (resume, evaluations, checkpoints) is tested in tests/test_round_loop.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from fedprime_core.config import ConfigError, config_to_dict
from fedprime_core.results import load_checkpoint
from tests.loopback import history, loopback_strategy, run_dir_of
from tests.loopback import run_server as run


@pytest.fixture()
def flower_logs(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def test_two_rounds_write_every_result_file(quick_config):
    cfg = quick_config(run_name="plain", fraction_evaluate=1.0)
    run(cfg)
    folder = run_dir_of(cfg)
    for name in (
        "config.json",
        "metrics.json",
        "metrics.csv",
        "summary.md",
        "summary.json",
        "clients.json",
        "curves.png",
        "checkpoint.json",
        "checkpoint-000002.npz",
    ):
        assert (folder / name).is_file(), name
    records = history(cfg)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert record["accepted"] == 3 and record["rejected"] == 0
        assert record["inter-pool-size"] >= cfg.kappa and record["intra-pool-size"] == cfg.tau
        assert record["bytes-sent"] > 0 and record["bytes-received"] > 0
        assert np.isfinite(record["train-loss"])
        assert set(record["eval"]) == {"val", "same-as-train", "miss-both", "full-modal", "text-only", "image-only"}
        assert 0.0 <= record["eval"]["full-modal"]["accuracy"] <= 1.0
        assert record["client-eval"]["num-examples"] > 0
    clients = json.loads((folder / "clients.json").read_text())
    assert sorted(clients) == ["0", "1", "2"]
    assert all(c["complete"] + c["text-missing"] + c["image-missing"] == c["num-train"] for c in clients.values())
    assert len({tuple(c["mixture"]) for c in clients.values()}) == 3  # each client its own missing mixture
    assert "| final (round 2) |" in (folder / "summary.md").read_text()


def test_the_order_replies_arrive_in_does_not_change_the_run(quick_config):
    """Clients finish in any order; a fixed seed gives the same metrics.json and state.

    (tests/test_federated.py checks the aggregation itself, pfpt's included, to the bit.)

    Two clients of four fail, so the recorded outcomes have an order to get wrong. Floats
    (losses, objectives, accuracies) are compared to float32 precision: CPU kernels here do
    not give bit-identical sums from one call to the next (round 0's held-out loss, before
    any aggregation, varies in the last bit).
    """
    folders = []
    for last_first in (False, True):
        cfg = quick_config(run_name=f"order-{last_first}", fraction_evaluate=1.0, fault_plan="1:nan,2:crash")
        run(cfg, num_nodes=4, last_first=last_first)
        folders.append(run_dir_of(cfg))
    wall = {"round-seconds", "aggregation-seconds", "inter-align-seconds", "inter-aggregation-seconds", "eval-seconds"}

    def leaves(value, path=""):
        if isinstance(value, dict):
            return {p: v for k, sub in value.items() if k not in wall for p, v in leaves(sub, f"{path}/{k}").items()}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return {p: v for i, sub in enumerate(value) for p, v in leaves(sub, f"{path}[{i}]").items()}
        return {path: value}

    first_run, second_run = (leaves(json.loads((f / "metrics.json").read_text())) for f in folders)
    assert first_run.keys() == second_run.keys()
    assert any(v for k, v in first_run.items() if k.endswith("/rejected-reasons"))
    for key, value in first_run.items():
        if isinstance(value, float):  # losses, objectives: float32 sums (see above)
            assert value == pytest.approx(second_run[key], rel=1e-5), key
        else:
            assert value == second_run[key], key
    first, second = (np.load(f / "final.npz") for f in folders)
    for name in first.files:
        np.testing.assert_allclose(first[name], second[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_bad_replies_are_rejected_and_the_round_goes_on(quick_config, flower_logs):
    cfg = quick_config(
        run_name="faults",
        fault_plan="1:nan,2:shape,3:crash",
        min_available_nodes=2,
        min_train_nodes=2,
        fraction_evaluate=0.0,
    )
    run(cfg, num_nodes=5)
    records = history(cfg)
    for record in records[1:]:
        assert record["accepted"] == 2 and record["rejected"] == 3
        assert not record["skipped"]
        text = " ".join(record["rejected-reasons"])
        assert "contains NaN or Inf" in text and "has shape" in text and "injected crash" in text
        assert np.isfinite(record["train-loss"])
    assert "rejected reply from node" in flower_logs.text


def test_a_round_with_too_few_valid_replies_is_skipped_and_the_state_kept(quick_config, flower_logs):
    cfg = quick_config(
        run_name="skipped", fault_plan="0:nan@2,1:zero@2", min_train_nodes=2, fraction_evaluate=0.0, num_server_rounds=2
    )
    run(cfg, num_nodes=2)
    records = history(cfg)
    assert records[1]["skipped"] is False and records[2]["skipped"] is True
    assert "round 2 skipped" in flower_logs.text
    state, meta = load_checkpoint(run_dir_of(cfg))
    assert meta["round"] == 2
    assert records[2]["eval"]["val"] == pytest.approx(records[2]["eval"]["val"])  # still evaluated


def test_centralized_p_trains_its_one_owner_through_the_server_every_round(quick_config):
    # Regression: the owner's reply carried partition-id -1, which the reply parser rejects, so
    # every round was skipped and the run failed after max-skipped-rounds (issue 30's D1 runs).
    cfg = quick_config(
        run_name="central", method="centralized-p", min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0
    )
    run(cfg, node_configs=[{"partition-id": 0, "num-partitions": 1}])
    records = history(cfg)
    trained = [r for r in records if r["round"] > 0]
    assert [r["round"] for r in trained] == [1, 2]
    for record in trained:
        assert record["accepted"] == 1 and record["rejected"] == 0 and not record["skipped"]
        assert record["train-examples"] > 200  # the whole training set, not a client's share
        assert np.isfinite(record["train-loss"])
    assert trained[1]["train-loss"] < trained[0]["train-loss"]
    assert json.loads((run_dir_of(cfg) / "summary.json").read_text())["status"] == "finished"


def test_partial_participation_and_offline_nodes(quick_config):
    cfg = quick_config(
        run_name="partial",
        fraction_train=0.5,
        min_train_nodes=1,
        min_available_nodes=2,
        fraction_evaluate=0.0,
        round_timeout=1.0,
    )
    run(cfg, num_nodes=4, offline=[4])
    for record in history(cfg)[1:]:
        assert record["sampled"] == 2 and record["accepted"] >= 1
        assert record["accepted"] + record["rejected"] + record["timed-out"] == 2


def test_messages_carry_no_backbone_tensor_and_no_data(quick_config):
    from fedprime_core import runtime
    from fedprime_protocol.logs import CLIENT_LOG
    from fedprime_protocol.messages import ARRAYS, CLIENT, PATTERN_USAGE, USAGE, WIRE

    cfg = quick_config(run_name="privacy", num_server_rounds=1, fraction_evaluate=0.0, server_eval=False)
    grid = run(cfg, num_nodes=2)
    model = runtime.process_model(cfg)
    backbone_shapes = {tuple(t.shape) for t in model.backbone.state_dict().values() if t.numel() > 64}
    trainable = set(model.trainable_parameters())
    replies = []
    for message in grid.sent:
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config=config_to_dict(cfg),
        )
        replies.append(grid.app(message, context))
    for message in [*grid.sent, *replies]:
        content = message.content
        for record in content.array_records.values():
            assert set(record) <= trainable
            assert not any(
                tuple(a.shape) in backbone_shapes and not name.startswith(("pools.", "pooler.", "head."))
                for name, a in record.items()
            )
        for name, record in content.config_records.items():
            assert name in ("config", USAGE, PATTERN_USAGE, CLIENT, CLIENT_LOG, WIRE)
            if name == CLIENT_LOG:  # the client's log lines; tests/test_logs.py checks they quote no sample
                continue
            for value in record.values():
                assert not isinstance(value, bytes)
                assert not (isinstance(value, str) and len(value) > 64)  # no texts
        total = sum(a.numpy().nbytes for r in content.array_records.values() for a in r.values())
        assert total < 0.5 * sum(t.numel() * t.element_size() for t in model.backbone.state_dict().values())
    assert any(ARRAYS in r.content.array_records for r in replies)


def test_a_lean_run_sends_what_the_profile_says_and_reports_the_bytes(quick_config, flower_logs):
    from fedprime_core import runtime
    from fedprime_protocol.messages import state_to_record

    cfg = quick_config(run_name="lean", comm_profile="lean", num_server_rounds=2, fraction_evaluate=0.0)
    grid = run(cfg, num_nodes=3)
    folder = run_dir_of(cfg)
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["comm-profile"], saved["wire-dtype"], saved["upload-delta"]) == ("lean", "float16", True)
    assert (saved["query-rank"], saved["exchange-pooler"]) == (8, True)
    lean_state = runtime.initial_state(cfg)
    assert "pooler.weight" in lean_state and lean_state["pools.inter.query.down"].shape == (8, 64)
    expected = state_to_record(lean_state, "float16").count_bytes()  # a client's own tau inter prompts: same shapes
    for record in history(cfg)[1:]:
        assert record["accepted"] == 3 and record["rejected"] == 0
        assert record["bytes-sent-per-client"] == expected == record["bytes-sent"] / 3
        assert record["bytes-received-per-client"] == expected  # deltas: same names, shapes and dtype
    for message in grid.sent:
        if message.metadata.message_type == MessageType.TRAIN:
            assert dict(message.content["wire"]) == {"dtype": "float16", "delta": False}
            assert all(a.dtype == "float16" for a in message.content["arrays"].values())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["communication"]["bytes-sent-per-client"] == expected
    assert summary["communication"]["bytes-received-total"] == 2 * 3 * expected
    text = (folder / "summary.md").read_text()
    assert "Communication (comm-profile=lean: wire-dtype=float16" in text
    assert f"per client {expected / 1e6:.3f} MB down, {expected / 1e6:.3f} MB up" in text
    assert "What travels: comm-profile=lean" in flower_logs.text and f"{expected / 1e6:.3f} MB down" in flower_logs.text
    # What travels defines the run: a resumed run cannot change it.
    with pytest.raises(ConfigError, match="'comm-profile'.*'query-rank'.*'upload-delta'.*'wire-dtype'"):
        run(quick_config(run_name="x", num_server_rounds=3, resume=str(folder)))


def test_bad_replies_in_float16_deltas_are_rejected_for_what_they_are(quick_config):
    cfg = quick_config(
        run_name="faults16",
        comm_profile="lean",
        fault_plan="1:nan,2:shape,3:huge",
        min_train_nodes=2,
        fraction_evaluate=0.0,
        num_server_rounds=1,
        server_eval=False,
    )
    run(cfg, num_nodes=5)
    [record] = history(cfg)
    assert record["accepted"] == 2 and record["rejected"] == 3
    reasons = " ".join(record["rejected-reasons"])
    assert "contains NaN or Inf (sent as float16 delta)" in reasons
    assert "has shape" in reasons
    # A value float16 cannot hold is refused by the client that has it, which says why; it never
    # reaches the server as an inf that would look like a diverged client.
    assert "beyond float16's range" in reasons and "Use wire-dtype='bfloat16'" in reasons


def test_lean_sends_and_receives_less_than_paper_and_a_frozen_pooler_never_travels(quick_config):
    # The same short run (one round, 3 nodes, same seed) under both profiles, and lean with the
    # pooler frozen: what actually went over the grid, counted by the strategy, and what the
    # TRAIN messages held.
    sent = {}
    for arm, profile, pooler in (("paper", "paper", True), ("lean", "lean", True), ("frozen", "lean", False)):
        cfg = quick_config(
            run_name=arm,
            comm_profile=profile,
            exchange_pooler=pooler,
            num_server_rounds=1,
            fraction_evaluate=0.0,
            server_eval=False,
        )
        grid = run(cfg, num_nodes=3)
        record = history(cfg)[-1]
        assert record["round"] == 1 and record["accepted"] == 3
        sent[arm] = (record["bytes-sent-per-client"], record["bytes-received-per-client"])
        trains = [m.content["arrays"] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
        assert len(trains) == 3
        names = set(trains[0].keys())
        assert ("pooler.weight" in names) == pooler  # a frozen pretrained pooler stays at home
        assert ("pools.inter.query.weight" in names) == (profile == "paper")
        assert ("pools.inter.query.down" in names) == (profile == "lean")
    (paper_down, paper_up), (lean_down, lean_up) = sent["paper"], sent["lean"]
    assert lean_down < paper_down / 2 and lean_up < paper_up / 2
    assert sent["frozen"][0] < lean_down and sent["frozen"][1] < lean_up


def test_flowers_own_start_drives_the_hooks(quick_config, flower_logs):
    """The hooks keep Flower's contract: Flower's Strategy.start runs them as it runs FedAvg's."""
    from flwr.app import MetricRecord

    from fedprime_protocol.messages import record_to_state, state_to_record

    cfg = quick_config(run_name="flower-start", fraction_evaluate=1.0, server_eval=False)
    strategy, grid, state = loopback_strategy(cfg)
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, record_to_state(arrays)))
        return MetricRecord({"arrays": len(arrays)})

    result = strategy.start(grid, state_to_record(state), num_rounds=2, timeout=60, evaluate_fn=evaluate_fn)
    assert [r for r, _ in seen] == [0, 1, 2]
    assert all(np.array_equal(seen[0][1][k], state[k]) for k in state)
    assert any(not np.array_equal(seen[2][1][k], state[k]) for k in state)  # it saw the aggregated state
    assert {r: m["accepted"] for r, m in result.train_metrics_clientapp.items()} == {1: 3, 2: 3}
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert result.evaluate_metrics_serverapp[2]["arrays"] == len(state)
    assert [m.metadata.message_type for m in grid.sent].count(MessageType.TRAIN) == 6
    # summary(): FedPrime's settings, then FedAvg's, which names the protocol's records.
    text = flower_logs.text
    assert text.index("FedPrime settings") < text.index("Sampling:") < text.index("ArrayRecord key: 'arrays'")
