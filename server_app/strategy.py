"""``FedPrimeStrategy``: the Flower Message-API strategy of every FedPrime method.

The strategy is an adapter: its hooks sample nodes, turn reply messages into
:class:`~fedprime_core.method.federated.ClientUpdate` objects and aggregate them with
:func:`~fedprime_core.method.federated.aggregate_round` (inter-prompt clustering-alignment,
intra-prompt / query-map / head FedAvg), keeping the global state. The rest is done by
collaborators it holds, one concern each:

* :class:`~server_app.transport.Transport`: waiting for and sampling nodes, pushing messages
  and pulling replies with stops (:mod:`server_app.transport`);
* :class:`~server_app.identities.NodeIdentities`: which client each node is, the site checks
  of nodes met after round 1, the federation's fingerprints (:mod:`server_app.identities`);
* :class:`~server_app.reply_accounting.ReplyAccounting`: every reply accepted, rejected or
  timed out, with its reason (:mod:`server_app.reply_accounting`);
* :class:`~server_app.round_loop.RunOutputs` and :func:`~server_app.round_loop.start_or_resume`:
  results and a checkpoint per round, resume, stops (:mod:`server_app.round_loop`).

The round hooks keep Flower's contract, so Flower's own ``start`` can run them; what a
hook leaves for the next is one frozen record, replaced whole each round
(:class:`~server_app.transport.Dispatch`: what a configure hook sent to whom;
:class:`~server_app.reply_accounting.TrainRecord`: what ``aggregate_train`` made of the
replies). The ServerApp runs the rounds with :meth:`FedPrimeStrategy.start_or_resume`.

Methods with personal inter pools (fedprime, fed-inter, fedprox-p) get one message per
node: the shared arrays plus that client's own ``tau`` inter prompts and keys
(:mod:`fedprime_core.method.interpool`); every client's slots are in the checkpoint, so a
resumed run gives every client back exactly its pool.

Arrays travel in the run's ``wire-dtype``; the strategy keeps, per node, the float32
arrays it sent, so a client's delta (``upload-delta``) is added to them, and records the
bytes it actually sent and received every round (``bytes-sent``, ``bytes-received`` and
their per-client figures in metrics.json and the summary).
A round's messages share one encoding of the global arrays (only each client's own inter
pool is encoded per client), so what the server holds while it waits for replies grows by
a client's own pool per client, not by the whole state (benchmarks/server_memory.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from fedprime_core.config import RunConfig, describe_communication, method_default_sweeps
from fedprime_core.failures import ClientOutcome
from fedprime_core.method.federated import AggregationSettings, GlobalState, mean_train_loss
from fedprime_core.method.methods import method_spec
from fedprime_core.metrics import CLIENT_TEST_PREFIX, weighted_means
from fedprime_protocol.messages import ARRAYS, CONFIG, EVALUATE_FIRST, NUM_EXAMPLES, state_to_record

from . import round_loop
from .identities import NodeIdentities
from .reply_accounting import ReplyAccounting, TrainRecord
from .round_loop import EvaluateFn, RunOutputs, ServerEvaluate
from .transport import Dispatch, StopCheck, Transport, build_dispatch


class FedPrimeStrategy(FedAvg):
    """Aggregates FedPrime prompt pools with alignment, everything else with FedAvg.

    Subclasses Flower's Message-API :class:`~flwr.serverapp.strategy.FedAvg` for its
    sampling parameters and summary; overrides the round hooks and adds :meth:`start_or_resume`.

    Args:
        cfg: the validated run configuration.
        run_dir: where results and checkpoints go.
        initial_state: the global trainable state to start from.
        history: round records of a resumed run (empty for a fresh run).
        clients: per-client info (pattern counts, ...) of a resumed run.
        server_fingerprint: the server's backbone fingerprint, if it loaded one.
        multilabel: whether the headline metric is macro-F1 (MM-IMDB) or accuracy.
        inter_record: the personal inter pools of a resumed run
            (:meth:`GlobalState.record`); a fresh run starts them from ``initial_state``.
        labels_fingerprint: fingerprint of the server's class list; a reply made with
            another class list is rejected (``None``: the first reply sets it).
        stop_check: asked while the strategy waits; a reason it returns stops the run
            (:class:`~fedprime_core.failures.RunFailed`) with the last completed round kept.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        initial_state: dict[str, np.ndarray],
        *,
        history: list[dict[str, Any]] | None = None,
        clients: dict[str, dict[str, Any]] | None = None,
        server_fingerprint: str | None = None,
        multilabel: bool = False,
        inter_record: dict[str, Any] | None = None,
        labels_fingerprint: str | None = None,
        stop_check: StopCheck | None = None,
    ) -> None:
        spec = method_spec(cfg.method)
        min_train = 1 if spec.centralized else cfg.min_train_nodes
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=min_train,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=1 if spec.centralized else cfg.min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,  # the protocol's names, which FedAvg's summary reports
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.cfg = cfg
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.model = GlobalState.restore(
            spec, initial_state, inter_record, cfg.inter_merge, inter_init=cfg.inter_init, seed=cfg.seed
        )
        self.sweeps = cfg.align_sweeps or method_default_sweeps(cfg.method)
        #: The run's round records and client records: one list and one dict, shared by the collaborators.
        self.history: list[dict[str, Any]] = list(history or [])
        self.clients: dict[str, dict[str, Any]] = dict(clients or {})
        self.transport = Transport(cfg, centralized=spec.centralized, stop_check=stop_check)
        self.identities = NodeIdentities(
            self.transport, self.clients, backbone_fingerprint=server_fingerprint, labels_fingerprint=labels_fingerprint
        )
        self.replies = ReplyAccounting(cfg, spec, self.model, self.identities, self.transport, self.clients)
        self.outputs = RunOutputs(
            cfg, self.run_dir, self.model, self.identities, self.history, self.clients, multilabel=multilabel
        )
        #: What the last configure hooks sent and what the last aggregate hooks made of it; each
        #: hook replaces its record whole (Flower's hooks pass nothing else from one to the next).
        self.train_sent = Dispatch()
        self.trained: TrainRecord | None = None
        self.evaluate_sent: Dispatch | None = None
        #: This round's train messages that also ask to evaluate (:meth:`fold_evaluation`).
        self._carried: tuple[Message, ...] = ()
        #: Client id -> metrics of the last client-side evaluation (:meth:`aggregate_evaluate`).
        self.evaluated: dict[str, dict[str, float]] = {}

    def summary(self) -> None:
        """Log FedPrime's settings, then FedAvg's sampling summary (as Flower's FedProx adds its own)."""
        log(INFO, "\t├──> FedPrime settings:")
        log(INFO, "\t│\t├── Method: %s (pools: %s)", self.cfg.method, ", ".join(self.spec.pools) or "none")
        if "inter" in self.spec.pools:
            limits = (self.cfg.inter_pool_max, self.sweeps)
            log(INFO, "\t│\t├── Inter pool: at most %d prompts, %d alignment sweeps", *limits)
            if self.spec.personalised_pools:
                regime = (self.cfg.inter_merge, self.cfg.inter_init, self.cfg.align_start, self.cfg.align_on)
                log(INFO, "\t│\t├── Personal inter pools: merge %s, init %s, align-start %s, align-on %s", *regime)
        log(INFO, "\t│\t└── What travels: %s", describe_communication(self.cfg))
        super().summary()

    def _dispatch(self, grid: Grid, server_round: int, config: ConfigRecord, kind: str, purpose: int) -> Dispatch:
        """Sample nodes (``purpose`` 1: train, 2: evaluate), identify them, build one message per node.

        Everyone gets the same arrays, or (personal inter pools) each client its own.
        """
        if purpose == 1:
            fraction, minimum = self.fraction_train, self.min_train_nodes
        else:
            fraction, minimum = self.fraction_evaluate, self.min_evaluate_nodes
        ids = self.identities
        node_ids = self.transport.sample(
            grid,
            fraction,
            minimum,
            self.min_available_nodes,
            server_round,
            purpose,
            known=ids.node_clients,
            excluded=ids.refused,
        )
        left_out: list[ClientOutcome] = []
        usable = ids.identify(grid, node_ids, server_round, left_out)
        config["server-round"] = server_round
        model = self.model
        arrays = {nid: model.client_arrays(ids.node_clients[nid]) if model.personal else model.arrays for nid in usable}
        clients = {nid: ids.node_clients.get(nid) for nid in usable}
        return build_dispatch(
            kind, config, arrays, clients, self.cfg.wire_dtype, sampled=len(node_ids), left_out=tuple(left_out)
        )

    # -- training --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the sampled clients what they train this round.

        Methods with personal inter pools: the shared arrays plus each client's own ``tau``
        inter prompts and keys (nodes seen for the first time are asked who they are
        first). Others: the global state (PFPT's pool changes size between rounds; clients
        resize their pools from the arrays they receive). The arrays sent are always the
        strategy's own global state, encoded in ``wire-dtype``; ``arrays`` (the base
        class's argument) is not used. What was sent is kept (a :class:`Dispatch`) for
        :meth:`aggregate_train`.
        """
        self._carried = ()
        sent = self.train_sent = self._dispatch(grid, server_round, config, MessageType.TRAIN, 1)
        log(
            INFO,
            "configure_train: round %d, %d client(s), %.1f kB each (%s)",
            server_round,
            len(sent.messages),
            sent.bytes_per_client / 1e3,
            self.cfg.wire_dtype,
        )
        return list(sent.messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then align inter prompts and FedAvg the rest.

        This is the Message-API successor of the legacy ``aggregate_fit`` hook. Every node
        the round was sent to ends up accepted, rejected or timed out
        (:meth:`ReplyAccounting.train <server_app.reply_accounting.ReplyAccounting.train>`:
        an error reply, or one that fails validation, is rejected with its reason logged and
        recorded); the round aggregates the rest. With fewer than ``min-train-nodes`` valid
        replies the round is skipped and the global state kept.

        What it made of the round (outcomes, bytes, the aggregation's figures) is kept as a
        :class:`TrainRecord`.
        """
        tally = self.replies.train(server_round, replies, self.train_sent)
        updates = list(tally.updates)
        counted = {
            "outcomes": tally.outcomes,
            "bytes_received": tally.bytes_received,
            "replies_with_arrays": tally.replies_with_arrays,
        }
        if len(updates) < self.min_train_nodes:
            log(
                WARNING,
                "round %d skipped: %d valid repl(y/ies), min-train-nodes is %d; keeping the global state",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            metrics = MetricRecord({"accepted": len(updates), "rejected": tally.rejected})
            self.trained = TrainRecord(arrays=None, metrics=metrics, **counted)
            return self.trained.arrays, self.trained.metrics
        settings = AggregationSettings(
            max_prompts=self.cfg.inter_pool_max,
            sweeps=self.sweeps,
            seed=self.cfg.seed * 1000 + server_round,
            inter_merge=self.cfg.inter_merge,
            align_start=self.cfg.align_start,
            align_on=self.cfg.align_on,
            align_theta_steps=self.cfg.align_theta_steps,
            pfpt_steps=self.cfg.pfpt_steps,
        )
        report = self.model.aggregate(updates, settings)
        train_loss = mean_train_loss(updates)
        metrics = {"train-loss": train_loss, "accepted": len(updates), "rejected": tally.rejected}
        metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
        self.trained = TrainRecord(
            arrays=state_to_record(self.model.arrays),
            metrics=MetricRecord(metrics),
            skipped=False,
            report=report,
            train_loss=train_loss,
            train_examples=int(np.array([u.num_examples for u in updates], dtype=np.float64).sum()),
            **counted,
        )
        return self.trained.arrays, self.trained.metrics

    # -- client-side evaluation -------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled clients to evaluate, on their local validation split and their own test set, the state
        they use: the global state, with their own inter pool where the method keeps one."""
        self.evaluate_sent = None
        self.evaluated = {}
        if self.fraction_evaluate == 0.0:
            return []
        # Evaluation is best effort: a node that cannot say who it is just does not evaluate.
        self.evaluate_sent = self._dispatch(grid, server_round, config, MessageType.EVALUATE, 2)
        return list(self.evaluate_sent.messages)

    def fold_evaluation(self, evaluated_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Evaluate the current state (``evaluated_round``'s) with the training just configured: one cycle.

        Call after :meth:`configure_train` of the next round, before anything changes the
        global state. The clients are sampled as :meth:`configure_evaluate` samples them for
        ``evaluated_round``; one that also trains this round gets no message of its own: its
        train message says ``evaluate-first`` and it evaluates the arrays as received (the
        same arrays an evaluate message would carry) before training on them. Only the others
        get an evaluate message, returned here to be sent with the train messages.
        :attr:`evaluate_sent` then holds both kinds (``nbytes``: the evaluate messages' only),
        and :meth:`aggregate_evaluate` takes the replies with ``carried`` set to
        :meth:`carried_evaluations`.
        """
        own = list(self.configure_evaluate(evaluated_round, ArrayRecord(), config, grid))
        ask = self.evaluate_sent
        self._carried = ()
        if ask is None or not own:
            return []
        training = {m.metadata.dst_node_id: m for m in self.train_sent.messages}
        carried, separate = [], []
        for message in own:
            train_message = training.get(message.metadata.dst_node_id)
            if train_message is None:
                separate.append(message)
                continue
            content = train_message.content
            content[CONFIG] = ConfigRecord({**dict(content.config_records[CONFIG]), EVALUATE_FIRST: evaluated_round})
            carried.append(train_message)
        self._carried = tuple(carried)
        nbytes = sum(int(m.content.array_records[ARRAYS].count_bytes()) for m in separate)
        self.evaluate_sent = replace(ask, messages=tuple(carried + separate), nbytes=nbytes)
        return separate

    def carried_evaluations(self) -> frozenset[str]:
        """Ids of this round's train messages that also asked to evaluate (:meth:`fold_evaluation`), once pushed."""
        return frozenset(m.metadata.message_id for m in self._carried if m.metadata.message_id)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], carried: frozenset[str] = frozenset()
    ) -> MetricRecord | None:
        """Sample-weighted means of the clients' metrics: each one's validation split, and its own test set
        (``test-*``, weighted by ``test-num-examples``), evaluated with the state it was sent.

        The replies that parse (:meth:`ReplyAccounting.evaluate
        <server_app.reply_accounting.ReplyAccounting.evaluate>`) are kept per client (by client
        id, in client order) for the round's record. ``carried``: the train messages whose
        replies hold the evaluation (:meth:`fold_evaluation`).
        """
        self.evaluated = self.replies.evaluate(server_round, replies, self.evaluate_sent or Dispatch(), carried)
        # Timings (eval-seconds) stay per client; the means are of the metrics.
        rows = [{k: v for k, v in m.items() if not k.endswith("-seconds")} for m in self.evaluated.values()]
        out = weighted_means(rows, groups=("", CLIENT_TEST_PREFIX))
        if not out:
            return None
        out.setdefault(NUM_EXAMPLES, 0)
        return MetricRecord(out)

    # -- the loop ---------------------------------------------------------------------
    def start_or_resume(
        self,
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
        """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start`, resumable: rounds ``len(history)+1 .. num_rounds``.

        The arguments mean what they mean to Flower's ``start`` (inherited, it runs these hooks
        too), and the hooks are called as it calls them. What this loop adds
        (:mod:`server_app.round_loop`):

        * **resume**: rounds already in ``history`` (a resumed run's checkpoint) are neither
          repeated nor lost; ``initial_arrays`` is then the checkpointed state;
        * **a checkpoint per round**: results (metrics.json, summary, curves) and a
          checkpoint after every round, so a stopped run can be resumed;
        * **stops**: it pushes and pulls the messages itself (:meth:`Transport.exchange
          <server_app.transport.Transport.exchange>`, not ``grid.send_and_receive``) and asks
          ``stop_check`` while it waits (a run whose SuperLink is gone stops now); it stops a
          run that cannot learn (below);
        * ``evaluate_held_out(round, state) -> {"val": {...}, "same-as-train": {...}, ...}``,
          FedPrime's server-side evaluation on the held-out sets, before round 1 of a fresh
          run and every ``eval-every`` rounds (``server-eval-every`` when set; and the last); nested
          into metrics.json, and from round 1 on flattened (``"val/accuracy"``) into
          ``result.evaluate_metrics_serverapp``, next to what ``evaluate_fn`` returns.

        Raises:
            RunFailed: nothing can learn (every sampled client failed with a config or data
                error, or ``max-skipped-rounds`` rounds in a row were skipped), or
                ``stop_check`` said stop (the SuperLink is gone). The round that showed it
                is saved; the summary says the run failed and why.
        """
        return round_loop.start_or_resume(
            self,
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn,
            evaluate_held_out=evaluate_held_out,
        )


__all__ = ["FedPrimeStrategy"]
