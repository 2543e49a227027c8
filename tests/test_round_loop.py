"""The resumable round loop: resume, both evaluations, results and a checkpoint per round, and how it fails.

:mod:`server_app.round_loop` runs the strategy's hooks as Flower's ``start`` does; these tests
drive it through the real ServerApp (``run``) or straight from a strategy on a loopback grid.
What happens when the folder cannot be written or the ServerApp dies: tests/test_failure_status.py.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import MessageType

from fedprime_core.config import ConfigError
from fedprime_core.failures import RunFailed
from fedprime_core.results import load_checkpoint
from tests.loopback import history, kill_the_server_in_round, loopback_strategy, run_dir_of
from tests.loopback import run_server as run


def resume_after_a_kill_in_round_two(quick_config, monkeypatch, tag: str) -> None:
    """Kill a run of independent personal pools in round 2, resume it, and check it ends as an uninterrupted run.

    Under ``inter-init = independent`` every client holds clusters of its own (ids from
    ``tau`` on), so slots that a resume forgot would not come back as they were: the
    identity, or a new client's fresh clusters, are never the checkpointed slots.
    """
    settings = dict(num_server_rounds=3, fraction_evaluate=0.0, inter_init="independent")
    cfg = quick_config(run_name=f"resumable-{tag}", **settings)
    folder = run_dir_of(cfg)

    revive = kill_the_server_in_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    _, meta = load_checkpoint(folder)
    assert meta["round"] == 1
    slots = meta["inter-pool"]["slots"]
    assert len(slots) == 3 and all(s != list(range(cfg.tau)) for s in slots.values()), "personal slots to restore"
    revive()
    resumed = quick_config(run_name="ignored", resume=str(folder), **settings)
    grid = run(resumed)
    rounds = [r["round"] for r in history(cfg)]
    assert rounds == [0, 1, 2, 3]  # nothing lost, nothing repeated
    trained = {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    assert trained == {2, 3}
    # The resumed run gave every client back exactly its personal inter pool: it ends where an
    # uninterrupted run of the same settings ends.
    reference = quick_config(run_name=f"reference-{tag}", **settings)
    run(reference)
    state, meta = load_checkpoint(folder)
    ref_state, ref_meta = load_checkpoint(run_dir_of(reference))
    pool, ref_pool = dict(meta["inter-pool"]), dict(ref_meta["inter-pool"])
    popularity, ref_popularity = pool.pop("popularity"), ref_pool.pop("popularity")
    assert pool == ref_pool, "the resumed run's personal inter pools differ from an uninterrupted run's"
    assert len(pool["slots"]) == 3
    # the popularity net's float32 output varies in the last bits from one process to the next
    np.testing.assert_allclose(popularity, ref_popularity, atol=1e-6)
    assert set(state) == set(ref_state)
    for name in state:
        np.testing.assert_allclose(state[name], ref_state[name], atol=2e-6, err_msg=name)


def test_resume_continues_after_the_last_completed_round(quick_config, monkeypatch):
    resume_after_a_kill_in_round_two(quick_config, monkeypatch, "plain")


@pytest.mark.slow  # a check of the check above: three more short runs
def test_the_resume_check_catches_a_restore_that_forgets_the_personal_slots(quick_config, monkeypatch):
    from fedprime_core.method.federated import GlobalState

    restore = GlobalState.restore.__func__

    def forgets_slots(cls, spec, state, record, *args, **kwargs):
        record = None if record is None else {**record, "slots": {}}
        return restore(cls, spec, state, record, *args, **kwargs)

    monkeypatch.setattr(GlobalState, "restore", classmethod(forgets_slots))
    with pytest.raises(AssertionError, match="personal inter pools differ"):
        resume_after_a_kill_in_round_two(quick_config, monkeypatch, "forgetful")


def test_a_finished_run_resumed_with_more_rounds_trains_only_the_new_ones(quick_config):
    # What an experiment grid does when its num-server-rounds is raised (experiments.plan.resumable_folder).
    settings = {"fraction_evaluate": 1.0, "client_test_samples": 20, "server_eval": False}
    cfg = quick_config(run_name="grow", num_server_rounds=1, **settings)
    run(cfg)
    folder = run_dir_of(cfg)
    grid = run(quick_config(run_name="grow", num_server_rounds=2, eval_every=2, resume=str(folder), **settings))
    rounds = history(cfg)
    assert [r["round"] for r in rounds] == [1, 2]  # no round 0 without the server's evaluation
    trained = {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    assert trained == {2}
    assert "client-eval" in rounds[0] and "client-eval" in rounds[1]  # the old last round and the new one
    assert json.loads((folder / "checkpoint.json").read_text())["round"] == 2
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_to_overwrite(quick_config):
    cfg = quick_config(run_name="once", num_server_rounds=1, fraction_evaluate=0.0, server_eval=False)
    run(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg)
    with pytest.raises(ConfigError, match="'tau'"):
        run(quick_config(run_name="x", tau=7, resume=str(run_dir_of(cfg))))
    with pytest.raises(FileNotFoundError, match="no checkpoint.json"):
        run(quick_config(run_name="x", resume=str(run_dir_of(cfg) / "nothing-here")))


def test_start_or_resume_keeps_evaluate_fns_meaning_next_to_the_held_out_sets(quick_config):
    from flwr.app import MetricRecord

    from fedprime_protocol.messages import state_to_record

    cfg = quick_config(run_name="both-evaluations", num_server_rounds=3, eval_every=2, fraction_evaluate=0.0)
    strategy, grid, state = loopback_strategy(cfg)
    flower, held_out = [], []

    def evaluate_fn(server_round, arrays):
        flower.append(server_round)
        return MetricRecord({"flower-metric": float(server_round)})

    def evaluate_held_out(server_round, global_state):
        held_out.append(server_round)
        return {"val": {"accuracy": 0.25, "num-examples": 8}}

    result = strategy.start_or_resume(
        grid, state_to_record(state), num_rounds=3, evaluate_fn=evaluate_fn, evaluate_held_out=evaluate_held_out
    )
    assert flower == [0, 1, 2, 3]  # Flower's meaning: before round 1 and after every round
    assert held_out == [0, 2, 3]  # every eval-every rounds and the last
    assert {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()} == {
        0: {"flower-metric": 0.0},
        1: {"flower-metric": 1.0},
        2: {"val/accuracy": 0.25, "val/num-examples": 8.0, "flower-metric": 2.0},
        3: {"val/accuracy": 0.25, "val/num-examples": 8.0, "flower-metric": 3.0},
    }
    records = history(cfg)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert [r["round"] for r in records if "eval" in r] == [0, 2, 3]
    assert records[2]["eval"] == {"val": {"accuracy": 0.25, "num-examples": 8}}
    assert all("bytes-sent-evaluate" not in r and r.get("accepted", 3) == 3 for r in records)


def test_server_eval_every_spaces_the_held_out_sets_while_clients_evaluate_every_eval_every(quick_config):
    cfg = quick_config(
        run_name="sparse-server", num_server_rounds=4, eval_every=1, server_eval_every=3, client_test_samples=20
    )
    run(cfg)
    records = history(cfg)
    assert [r["round"] for r in records if "eval" in r] == [0, 3, 4]  # before round 1, every 3rd and the last
    assert [r["round"] for r in records if "client-eval" in r] == [1, 2, 3, 4]
    assert all("test-accuracy" in r["client-eval"] for r in records if "client-eval" in r)


def test_run_outputs_write_results_then_the_checkpoint_and_take_back_a_round_they_could_not_save(
    quick_config, monkeypatch
):
    cfg = quick_config(run_name="outputs", num_server_rounds=1)
    strategy, _, state = loopback_strategy(cfg)
    outputs = strategy.outputs
    strategy.identities.reference_fingerprint = "f" * 16  # set by the first reply that carries one
    strategy.history.append({"round": 0, "eval": {"val": {"accuracy": 0.5, "num-examples": 8}}})
    strategy.clients["a"] = {"state": "training"}
    outputs.persist(0, "title", "running")
    _, meta = load_checkpoint(run_dir_of(cfg))
    assert meta["round"] == 0 and meta["fingerprint"] == "f" * 16 and meta["clients"] == {"a": {"state": "training"}}
    assert meta["state-keys"] == sorted(state) and meta["history"] == strategy.history
    assert json.loads((run_dir_of(cfg) / "clients.json").read_text()) == strategy.clients

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run_dir_of(cfg) / "metrics.json"))

    monkeypatch.setattr("server_app.round_loop.save_checkpoint", full)
    strategy.history.append({"round": 1, "skipped": True})
    with pytest.raises(RunFailed, match=r"cannot write the results of round 1 .*No space left on device"):
        outputs.persist(1, "title", "running")
    assert [r["round"] for r in strategy.history] == [0]  # its checkpoint was not committed
    assert load_checkpoint(run_dir_of(cfg))[1]["round"] == 0


def test_the_round_line_names_each_client_or_sums_them_up(quick_config, caplog):
    from server_app.round_loop import RoundLoop

    caplog.set_level(logging.INFO, logger="flwr")
    cfg = quick_config(run_name="lines")
    strategy, _, _ = loopback_strategy(cfg)
    loop = RoundLoop(strategy)
    few = {"site-a": {"accuracy": 0.45}, "site-b": {"accuracy": 0.5}}
    assert loop._scores_line(few) == "site-a 45.0, site-b 50.0 (accuracy %)"
    many = {f"c{i}": {"accuracy": i / 10} for i in range(10)}
    assert loop._scores_line(many) == (
        "10 clients, accuracy % min 0.0 / median 45.0 / max 90.0 (each client in metrics.json)"
    )
    record = {"round": 2, "skipped": True, "sampled": 3, "accepted": 0, "rejected": 3, "round-seconds": 1.25}
    loop._log_round(record, 5)
    assert "[round 2/5] SKIPPED train-loss - | clients 3 sampled: 0 accepted, 3 rejected, 0 timed out" in caplog.text


def test_resume_conflicts_read_an_older_checkpoint_as_the_run_it_was():
    from fedprime_core.config import PROFILE_VALUES, config_to_dict, parse_run_config
    from fedprime_core.results import resume_conflicts

    current = config_to_dict(parse_run_config({"num-server-rounds": 5}))
    stored = {k: v for k, v in current.items() if k not in PROFILE_VALUES["paper"] and k != "comm-profile"}
    assert resume_conflicts({**stored, "num-server-rounds": 2}, current) == []  # 'paper' before the keys existed
    assert resume_conflicts({**stored, "tau": current["tau"] + 1}, current) == [
        f"'tau' ({current['tau'] + 1} -> {current['tau']})"
    ]
    lean = config_to_dict(parse_run_config({"comm-profile": "lean"}))
    changed = [c.split(" ")[0] for c in resume_conflicts(stored, lean)]
    assert changed == ["'comm-profile'", "'query-rank'", "'upload-delta'", "'wire-dtype'"]
