"""The resumable round loop: Flower's ``Strategy.start`` plus what a long federated run needs.

:func:`start_or_resume` runs a strategy's hooks as Flower's ``start`` runs them, and adds:
resume (rounds already in the history are neither repeated nor lost), results and a
checkpoint after every round (:class:`RunOutputs`), stops (the SuperLink is gone, nothing
can learn) and FedPrime's server-side evaluation of the held-out sets every ``eval-every``
rounds (``server-eval-every`` when set). It logs one line per round.

Client-side evaluation costs no message cycle of its own except in the last round: the state
a round leaves is what the next round's train messages carry, so the clients sampled to
evaluate it that also train next evaluate it first, as received, and send the metrics with
their training (:meth:`~server_app.strategy.FedPrimeStrategy.fold_evaluation`); the others get
their evaluate message in the same exchange. The round's record is marked
``client-eval-pending`` until then, gets ``client-eval``, ``client-eval-per-client`` and
``client-eval-in-round`` (the round that carried it) when the replies are in, and is saved
again with that round. On a deployment a message cycle costs seconds whatever the work (a
ClientApp process per message, the SuperNode's and the SuperExec's polls), so this halves
the fixed cost of a round that evaluates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.result import Result

from fedprime_core.config import RunConfig, config_to_dict, describe_communication
from fedprime_core.failures import RunFailed, one_line, stop_reason
from fedprime_core.method.federated import GlobalState
from fedprime_core.results import metric_name, save_checkpoint, write_json, write_run_outputs
from fedprime_protocol.messages import state_to_record

from .identities import NodeIdentities
from .sites import setting_label

if TYPE_CHECKING:
    from .strategy import FedPrimeStrategy

#: A round record's mark: its client-side evaluation travels with the next round's training
#: (:meth:`~server_app.strategy.FedPrimeStrategy.fold_evaluation`) and has not arrived yet.
PENDING = "client-eval-pending"
#: ``evaluate_held_out(round, state) -> {"val": {...}, "same-as-train": {...}, ...}`` (see :func:`start_or_resume`)
ServerEvaluate = Callable[[int, dict[str, np.ndarray]], dict[str, dict[str, float]]]
#: Flower's ``evaluate_fn(round, arrays) -> metrics``.
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class RunOutputs:
    """A run's folder: results after every round, then the checkpoint that makes the round resumable.

    Args:
        cfg: the run configuration (written into the checkpoint; resume compares it).
        run_dir: the run folder.
        model: the global state, checkpointed with its personal inter pools.
        identities: whose backbone fingerprint goes into the checkpoint.
        history: the rounds' records (``metrics.json``); shared with the strategy.
        clients: client id -> its record (``clients.json``); shared with the strategy.
        multilabel: whether the headline metric is macro-F1 or accuracy.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        model: GlobalState,
        identities: NodeIdentities,
        history: list[dict[str, Any]],
        clients: dict[str, dict[str, Any]],
        *,
        multilabel: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.model = model
        self.identities = identities
        self.history = history
        self.clients = clients
        self.multilabel = multilabel

    def persist(self, server_round: int, title: str, status: str = "running", reason: str = "") -> None:
        """Results first, checkpoint last: the checkpoint's round is the last complete one.

        Raises:
            RunFailed: a file cannot be written (disk full, the folder turned read-only or
                went away); the round is taken back out of the history, since its
                checkpoint was not committed.
        """
        try:
            self._write_outputs(title, status, reason)
            write_json(self.run_dir / "clients.json", self.clients)
            save_checkpoint(
                self.run_dir,
                self.model.arrays,
                {
                    "round": server_round,
                    "history": self.history,
                    "clients": self.clients,
                    "config": config_to_dict(self.cfg),
                    "state-keys": sorted(self.model.arrays),
                    "fingerprint": self.identities.reference_fingerprint,
                    "inter-pool": self.model.record(),
                },
            )
        except OSError as exc:
            if self.history and self.history[-1].get("round") == server_round:
                self.history.pop()
            where = f" ({exc.filename})" if exc.filename else ""
            raise RunFailed(
                f"cannot write the results of round {server_round} to {self.run_dir}: "
                f"{exc.strerror or exc}{where} [{type(exc).__name__}]; the checkpoint stays at the last round saved"
            ) from exc

    def _write_outputs(self, title: str, status: str, reason: str) -> None:
        """metrics.json, the summaries and the curves of the history so far (``OSError`` passes through)."""
        write_run_outputs(
            self.run_dir,
            self.history,
            self.multilabel,
            title,
            status=status,
            reason=reason,
            wire=describe_communication(self.cfg),
            clients=self.clients,
        )

    def write_failed(self, title: str, reason: str) -> None:
        """The summary of a failed run, as far as the folder can still be written (else a log line says so)."""
        try:
            self._write_outputs(title, "failed", reason)
        except OSError as exc:
            log(ERROR, "cannot write the failed status to %s either: %s", self.run_dir, exc.strerror or exc)


def start_or_resume(
    strategy: FedPrimeStrategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int = 3,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: EvaluateFn | None = None,
    *,
    evaluate_held_out: ServerEvaluate | None = None,
) -> Result:
    """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start` over ``strategy``'s hooks, resumable.

    See :meth:`server_app.strategy.FedPrimeStrategy.start_or_resume`.
    """
    loop = RoundLoop(strategy, evaluate_config, evaluate_fn, evaluate_held_out)
    return loop.run(grid, initial_arrays, num_rounds, timeout, train_config)


class RoundLoop:
    """One run of rounds ``len(history)+1 .. num_rounds`` of a strategy (see :func:`start_or_resume`)."""

    def __init__(
        self,
        strategy: FedPrimeStrategy,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        evaluate_held_out: ServerEvaluate | None = None,
    ) -> None:
        self.strategy = strategy
        self.cfg = strategy.cfg
        self.outputs = strategy.outputs
        self.history = strategy.history
        self.multilabel = strategy.outputs.multilabel
        self.evaluate_config = evaluate_config
        self.evaluate_fn = evaluate_fn
        self.evaluate_held_out = evaluate_held_out

    def run(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord | None = None,
    ) -> Result:
        """The rounds after the last completed one; the result's arrays are the final global state.

        Raises:
            RunFailed: nothing can learn, or ``stop_check`` said stop; the summary says why.
        """
        strategy, cfg = self.strategy, self.cfg
        result = Result(arrays=initial_arrays)
        done = max((r["round"] for r in self.history), default=-1)
        title = f"{cfg.method} on {cfg.dataset} ({setting_label(cfg, bool(strategy.identities.sites_only))})"
        strategy.summary()
        skipped_in_a_row = 0
        for record in reversed(self.history):
            if record["round"] == 0 or not record.get("skipped"):
                break
            skipped_in_a_row += 1
        saved = False
        try:
            if done < 0 and self.evaluate_held_out is not None:  # round 0: metrics.json only, as before
                record = {"round": 0, **self._held_out(0)}
                self.history.append(record)
                self._log_eval(0, record["eval"])
                if record.get("eval-top-tau-same") is False:
                    self._log_eval(0, record["eval-top-tau"], f"the {cfg.tau} most popular inter centres")
                self.outputs.persist(0, title, "running" if num_rounds > 0 else "finished")
            if done < 0 and self.evaluate_fn is not None:
                self._server_evaluation(0, result, held_out=False)
            first = max(done, 0) + 1
            # A round's client-side evaluation travels with the next round's training (one message
            # cycle, not two); a resumed run picks up the one its last round left pending.
            pending = done if done > 0 and self.history[-1].get(PENDING) else None
            if first > num_rounds:
                log(INFO, "all %d rounds already completed in %s", num_rounds, self.outputs.run_dir)
                if pending is not None:  # resumed with fewer rounds: the last one's evaluation still owed
                    self.history[-1].update(self._client_evaluation(pending, grid, result))
                    self.history[-1].pop(PENDING, None)
                    self.outputs.persist(pending, title, "finished")
            for server_round in range(first, num_rounds + 1):
                strategy.transport.check_stop()
                started = time.perf_counter()
                messages = list(
                    strategy.configure_train(server_round, result.arrays, ConfigRecord(dict(train_config or {})), grid)
                )
                sent = strategy.train_sent
                if pending is not None:
                    messages += strategy.fold_evaluation(pending, ConfigRecord(dict(self.evaluate_config or {})), grid)
                replies = strategy.transport.exchange(grid, messages, timeout)
                to_train = {m.metadata.message_id for m in sent.messages}
                train_replies = [m for m in replies if m.metadata.reply_to_message_id in to_train]
                if pending is not None:
                    self._take_folded_evaluation(pending, server_round, replies, result)
                    pending = None
                new_arrays, train_metrics = strategy.aggregate_train(server_round, train_replies)
                # The replies hold every client's arrays: not kept through evaluation and into the next round.
                del messages, replies, train_replies
                trained = strategy.trained
                assert trained is not None  # set by aggregate_train
                if new_arrays is not None:
                    result.arrays = new_arrays
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                record = {
                    "round": server_round,
                    "sampled": sent.sampled,
                    "bytes-sent": sent.nbytes,
                    "bytes-sent-per-client": sent.bytes_per_client,
                    **trained.row(),
                }
                skipped_in_a_row = skipped_in_a_row + 1 if trained.skipped else 0
                failure = stop_reason(list(trained.outcomes), skipped_in_a_row, cfg.max_skipped_rounds)
                if failure is None:
                    # Both evaluations every eval-every rounds (the server's every server-eval-every
                    # rounds when set) and in the last one.
                    last = server_round == num_rounds
                    evaluating = not server_round % cfg.eval_every or last
                    held_out = not server_round % (cfg.server_eval_every or cfg.eval_every) or last
                    if evaluating and last:
                        record.update(self._client_evaluation(server_round, grid, result))
                    elif evaluating and strategy.fraction_evaluate > 0:
                        record[PENDING] = True
                        pending = server_round
                    record.update(self._server_evaluation(server_round, result, held_out=held_out))
                record["round-seconds"] = time.perf_counter() - started
                self.history.append(record)
                self._log_round(record, num_rounds)
                if failure is not None:
                    self.outputs.persist(server_round, title, "failed", failure)
                    saved = True
                    raise RunFailed(failure)
                self.outputs.persist(server_round, title, "finished" if server_round == num_rounds else "running")
        except RunFailed as exc:
            last = max((r["round"] for r in self.history), default=0)
            log(ERROR, "FedPrime run FAILED after round %d: %s", last, exc)
            if not saved:
                # Stopped inside a round: the global state may already hold part of it, so the
                # checkpoint stays at the last completed round; only the summary changes.
                self.outputs.write_failed(title, str(exc))
            raise
        except BaseException as exc:  # a bug, an interrupt, flwr stop: the summary must not say "running"
            last = max((r["round"] for r in self.history), default=0)
            reason = self._stop_reason(exc)
            log(ERROR, "FedPrime run FAILED after round %d: %s", last, reason)
            self.outputs.write_failed(title, reason)
            raise
        result.arrays = state_to_record(strategy.model.arrays)
        return result

    def _client_evaluation(self, server_round: int, grid: Grid, result: Result) -> dict[str, Any]:
        """Client-side evaluation in a cycle of its own (the last round): the round's ``bytes-sent-evaluate``,
        ``client-eval`` (the sample-weighted means) and ``client-eval-per-client`` (client id -> its metrics)."""
        strategy = self.strategy
        config = ConfigRecord(dict(self.evaluate_config or {}))
        messages = list(strategy.configure_evaluate(server_round, result.arrays, config, grid))
        fields: dict[str, Any] = {}
        if strategy.evaluate_sent is not None:
            fields["bytes-sent-evaluate"] = strategy.evaluate_sent.nbytes
        if messages:
            replies = strategy.transport.exchange(grid, messages, self.cfg.round_timeout)
            fields.update(self._client_scores(server_round, strategy.aggregate_evaluate(server_round, replies), result))
        return fields

    def _client_scores(self, server_round: int, client_eval: MetricRecord | None, result: Result) -> dict[str, Any]:
        """``client-eval`` and ``client-eval-per-client`` of ``server_round``'s state; each site's last own
        scores into clients.json."""
        strategy = self.strategy
        if client_eval is None:
            return {}
        result.evaluate_metrics_clientapp[server_round] = client_eval
        for client, scores in strategy.evaluated.items():
            if client in strategy.clients:  # each site's last own scores, in clients.json
                strategy.clients[client]["client-val"] = {**scores, "round": server_round}
        return {"client-eval": dict(client_eval), "client-eval-per-client": dict(strategy.evaluated)}

    def _take_folded_evaluation(
        self, evaluated_round: int, server_round: int, replies: list[Message], result: Result
    ) -> None:
        """The client-side evaluation of ``evaluated_round``'s state that travelled with ``server_round``'s
        training (:meth:`FedPrimeStrategy.fold_evaluation`), into that round's record (which is
        saved again with this round's) and one log line."""
        strategy = self.strategy
        record = next(r for r in reversed(self.history) if r["round"] == evaluated_round)
        sent = strategy.evaluate_sent
        fields: dict[str, Any] = {"client-eval-in-round": server_round}
        if sent is not None:
            fields["bytes-sent-evaluate"] = sent.nbytes
            asked = {m.metadata.message_id for m in sent.messages}
            answers = [m for m in replies if m.metadata.reply_to_message_id in asked]
            client_eval = strategy.aggregate_evaluate(evaluated_round, answers, strategy.carried_evaluations())
            fields.update(self._client_scores(evaluated_round, client_eval, result))
        record.pop(PENDING, None)
        record.update(fields)
        if "client-eval" in fields:
            self._log_client_eval(record, f", evaluated with round {server_round}'s training")

    def _held_out(self, server_round: int) -> dict[str, Any]:
        """The held-out evaluation of the global state (``eval``) and, with ``server-eval-top-tau``, of the
        state a new client starts from (``eval-top-tau``).

        ``eval-top-tau``: the global state with only the ``tau`` most popular centres of the
        personal inter pool (the same size under ``align`` and ``position``). Where that is the
        same model as ``eval`` (no personal pool, or a pool of at most ``tau`` centres) it is
        neither evaluated nor written again: the record says ``eval-top-tau-same: true`` (and
        readers take ``eval``: :func:`fedprime_core.results.top_tau_evaluation`).
        """
        evaluate_held_out = self.evaluate_held_out
        assert evaluate_held_out is not None
        model = self.strategy.model
        fields: dict[str, Any] = {"eval": evaluate_held_out(server_round, model.arrays)}
        if self.cfg.server_eval_top_tau:
            top = model.top_tau_arrays()
            fields["eval-top-tau-same"] = top is None
            if top is not None:
                fields["eval-top-tau"] = evaluate_held_out(server_round, top)
        return fields

    def _server_evaluation(self, server_round: int, result: Result, *, held_out: bool) -> dict[str, Any]:
        """Server-side evaluation: the held-out sets (the round's ``eval``, when ``held_out``) and Flower's
        ``evaluate_fn``.

        Both go into ``result.evaluate_metrics_serverapp`` (the held-out metrics flattened).
        """
        fields: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        if held_out and self.evaluate_held_out is not None:
            fields = self._held_out(server_round)
            metrics.update({f"{s}/{k}": float(v) for s, m in fields["eval"].items() for k, v in m.items()})
            if fields.get("eval-top-tau-same") is False:
                top = fields["eval-top-tau"]
                metrics.update({f"top-tau/{s}/{k}": float(v) for s, m in top.items() for k, v in m.items()})
        if self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(server_round, result.arrays) or {})
        if metrics:
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
        return fields

    def _stop_reason(self, exc: BaseException) -> str:
        """One line on why the loop ended with ``exc``, which is not a :class:`RunFailed`."""
        if isinstance(exc, KeyboardInterrupt):
            stop_check = self.strategy.transport.stop_check
            lost = stop_check() if stop_check is not None else None
            return lost or "the ServerApp was interrupted (SIGINT)"
        if isinstance(exc, SystemExit):
            return f"the ServerApp was stopped (exit code {exc.code}: flwr stop, SIGTERM, or its SuperLink went away)"
        return (
            f"the ServerApp failed: {one_line(f'{type(exc).__name__}: {exc}')} (a bug: please report it with the log)"
        )

    def _scores_line(self, by_client: Mapping[str, Mapping[str, float]], shown: int = 8) -> str:
        """``site-a 45.0, site-b 50.0 (accuracy %)``; for more than ``shown`` clients their min, median and max."""
        metric = metric_name(self.multilabel)
        scores = {c: 100 * float(m[metric]) for c, m in by_client.items() if metric in m}
        if len(scores) <= shown:
            return ", ".join(f"{c} {v:.1f}" for c, v in scores.items()) + f" ({metric} %)"
        values = sorted(scores.values())
        return (
            f"{len(values)} clients, {metric} % min {values[0]:.1f} / median {float(np.median(values)):.1f} / "
            f"max {values[-1]:.1f} (each client in metrics.json)"
        )

    def _log_eval(self, server_round: int, evaluation: dict[str, dict[str, float]], pool: str = "") -> None:
        metric = metric_name(self.multilabel)
        parts = ", ".join(f"{name} {100 * m.get(metric, float('nan')):.1f}" for name, m in evaluation.items())
        log(INFO, "round %d server-side %s (%%)%s: %s", server_round, metric, f", {pool}" if pool else "", parts)

    def _log_round(self, record: dict[str, Any], num_rounds: int) -> None:
        """The round's one line (with each client's own validation score when clients evaluated), then the server's."""
        r = record
        pools = ", ".join(f"{p} pool {r[f'{p}-pool-size']}" for p in self.strategy.spec.pools if f"{p}-pool-size" in r)
        by_client = r.get("client-eval-per-client")
        log(
            INFO,
            "[round %d/%d] %s train-loss %s | clients %s sampled: %s accepted, %s rejected, %s timed out | %s "
            "| %.1fs%s",
            r["round"],
            num_rounds,
            "SKIPPED" if r.get("skipped") else "",
            f"{r['train-loss']:.4f}" if "train-loss" in r else "-",
            r.get("sampled", 0),
            r.get("accepted", 0),
            r.get("rejected", 0),
            r.get("timed-out", 0),
            pools or "no retrieval pools",
            r["round-seconds"],
            f" | client val {self._scores_line(by_client)}" if by_client else "",
        )
        if "eval" in r:
            self._log_eval(r["round"], r["eval"])
        if r.get("eval-top-tau-same") is False:
            self._log_eval(r["round"], r["eval-top-tau"], f"the {self.cfg.tau} most popular inter centres")
        if "client-eval" in r:
            self._log_client_eval(r)

    def _log_client_eval(self, record: dict[str, Any], when: str = "") -> None:
        """``round 3 client-side accuracy (%, 4 clients): validation 51.0, own test sets 49.5`` (+ ``when``)."""
        metric = metric_name(self.multilabel)
        means = record["client-eval"]
        parts = [f"validation {100 * means[metric]:.1f}"] if metric in means else []
        if f"test-{metric}" in means:
            parts.append(f"own test sets {100 * means[f'test-{metric}']:.1f}")
        by_client = record.get("client-eval-per-client", {})
        log(
            INFO,
            "round %d client-side %s (%%, %d clients%s): %s",
            record["round"],
            metric,
            len(by_client),
            when,
            ", ".join(parts) or "-",
        )
        if when and by_client:
            log(INFO, "round %d client val %s", record["round"], self._scores_line(by_client))
