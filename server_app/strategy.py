"""``FedPrimeStrategy``: the Flower Message-API strategy of every FedPrime method.

The strategy is an adapter: it samples nodes, turns reply messages into
:class:`~fedprime_core.method.federated.ClientUpdate` objects, validates them with
:func:`~fedprime_core.method.federated.validate_update` and aggregates them with
:func:`~fedprime_core.method.federated.aggregate_round` (inter-prompt clustering-alignment,
intra-prompt / query-map / head FedAvg). It keeps the global state, writes the results
and a checkpoint after every round, and can start from a checkpoint (resume).

The round hooks keep Flower's contract, so Flower's own ``start`` can run them; what a
hook leaves for the next is one frozen record, replaced whole each round (:class:`Dispatch`:
what a configure hook sent to whom; :class:`TrainRecord`: what ``aggregate_train`` made of
the replies). The ServerApp runs the rounds with :meth:`FedPrimeStrategy.start_or_resume`,
Flower's loop plus resume, a checkpoint per round and the stops a long run needs.

Methods with personal inter pools (fedprime, fed-inter, fedprox-p) get one message per
node: the shared arrays plus that client's own ``tau`` inter prompts and keys
(:mod:`fedprime_core.method.interpool`). The strategy learns which client a node is with one
identity query the first time it samples the node (node ids change when a SuperNode or
a simulation restarts; client ids do not), and keeps every client's slots in the
checkpoint, so a resumed run gives every client back exactly its pool.

Arrays travel in the run's ``wire-dtype``; the strategy keeps, per node, the float32
arrays it sent, so a client's delta (``upload-delta``) is added to them, and records the
bytes it actually sent and received every round (``bytes-sent``, ``bytes-received`` and
their per-client figures in metrics.json and the summary).
A round's messages share one encoding of the global arrays (only each client's own inter
pool is encoded per client), so what the server holds while it waits for replies grows by
a client's own pool per client, not by the whole state (benchmarks/server_memory.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from fedprime_core.config import RunConfig, config_to_dict, describe_communication, method_default_sweeps
from fedprime_core.failures import ClientOutcome, RunFailed, one_line, parse_reason, stop_reason
from fedprime_core.method.federated import (
    AggregationSettings,
    GlobalState,
    client_id_problem,
    client_order,
    mean_train_loss,
    validate_update,
)
from fedprime_core.method.methods import method_spec
from fedprime_core.metrics import CLIENT_TEST_PREFIX, weighted_means
from fedprime_core.progress import format_duration
from fedprime_core.results import metric_name, save_checkpoint, write_json, write_run_outputs
from fedprime_protocol.messages import (
    ARRAYS,
    CLIENT,
    CONFIG,
    NUM_EXAMPLES,
    SITE_CHECK,
    identity_query,
    instruction_contents,
    parse_evaluate_reply,
    parse_identity_record,
    parse_train_reply,
    state_to_record,
)
from fedprime_protocol.replies import ReplyLimits

from .nodes import NotEnoughNodesError, wait_for_nodes
from .sites import SiteVerdict, reply_site_check, setting_label, site_verdicts

#: ``evaluate_held_out(round, state) -> {"val": {...}, "same-as-train": {...}, ...}`` (see ``start_or_resume``)
ServerEvaluate = Callable[[int, dict[str, np.ndarray]], dict[str, dict[str, float]]]
#: ``stop_check() -> reason`` when the run must stop now (its SuperLink is gone), else ``None``.
StopCheck = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class Dispatch:
    """What a configure hook sent in one round: the messages, each node's client and arrays, the bytes.

    The strategy keeps it until the replies are aggregated (Flower's aggregate hooks get only
    the replies): a reply finds its node through the message it answers, and a client's delta
    (``upload-delta``) is added to the float32 arrays its node was sent.

    Attributes:
        messages: one message per node (their ids are set when the grid pushes them).
        clients: node id -> client id, as far as the strategy knows it (``None``: unknown).
        arrays: node id -> the float32 arrays sent to it.
        sampled: how many nodes were sampled; some may have been left out before sending.
        nbytes: bytes of the encoded arrays of all the messages.
        left_out: outcomes of the sampled nodes that got no message (no identity, a client id
            claimed twice).
    """

    messages: tuple[Message, ...] = ()
    clients: Mapping[int, str | None] = field(default_factory=dict)
    arrays: Mapping[int, Mapping[str, np.ndarray]] = field(default_factory=dict)
    sampled: int = 0
    nbytes: int = 0
    left_out: tuple[ClientOutcome, ...] = ()

    @property
    def bytes_per_client(self) -> float:
        return self.nbytes / max(len(self.messages), 1)

    def destinations(self) -> dict[str, int]:
        """Message id -> destination node (ids exist once the grid pushed the messages)."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages if m.metadata.message_id}


@dataclass(frozen=True, slots=True)
class TrainRecord:
    """What ``aggregate_train`` made of one round's replies.

    Attributes:
        outcomes: every sampled node, accepted, rejected or timed out (those left out before
            sending first).
        arrays, metrics: what the hook returns (Flower's contract); ``arrays`` is ``None``
            when the round was skipped.
        bytes_received: bytes of the arrays of the replies that carried any.
        replies_with_arrays: how many replies carried arrays.
        skipped: fewer than ``min-train-nodes`` valid replies; the global state was kept.
        report: the aggregation's figures (pool sizes, alignment cost, ...); empty when skipped.
        train_loss: sample-weighted mean training loss of the accepted replies (``None``: skipped).
        train_examples: their training samples.
    """

    outcomes: tuple[ClientOutcome, ...]
    arrays: ArrayRecord | None
    metrics: MetricRecord
    bytes_received: int = 0
    replies_with_arrays: int = 0
    skipped: bool = True
    report: Mapping[str, Any] = field(default_factory=dict)
    train_loss: float | None = None
    train_examples: int = 0

    def with_status(self, status: str) -> list[ClientOutcome]:
        return [o for o in self.outcomes if o.status == status]

    def row(self) -> dict[str, Any]:
        """The round's fields in metrics.json: bytes received, outcome counts and reasons, the aggregation."""
        rejected, silent = self.with_status("rejected"), self.with_status("timed-out")
        row: dict[str, Any] = {
            "bytes-received": self.bytes_received,
            "accepted": len(self.with_status("accepted")),
            "rejected": len(rejected),
            "timed-out": len(silent),
            "rejected-reasons": [o.describe() for o in rejected],
            "timed-out-nodes": [o.describe() for o in silent],
            "bytes-received-per-client": self.bytes_received / max(self.replies_with_arrays, 1),
        }
        if self.skipped:
            row["skipped"] = True
            return row
        row.update(self.report)
        row.update({"train-loss": self.train_loss, "train-examples": self.train_examples, "skipped": False})
        return row


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
        #: Pools whose pattern-usage table a reply must carry (the alignment compares retrieval profiles).
        self.pattern_usage_required = (
            tuple(spec.personalised_pools) if cfg.inter_merge == "align" and cfg.align_on == "usage" else ()
        )
        self.history: list[dict[str, Any]] = list(history or [])
        self.clients: dict[str, dict[str, Any]] = dict(clients or {})
        self.reference_fingerprint = server_fingerprint
        self.multilabel = multilabel
        self.reference_labels = labels_fingerprint
        self.sweeps = cfg.align_sweeps or method_default_sweeps(cfg.method)
        #: node id -> client id, learned by identity queries (never checkpointed: node ids change).
        self.node_clients: dict[int, str] = {}
        #: node id -> its typed identity record (:func:`~fedprime_protocol.messages.parse_identity_record`).
        self.node_records: dict[int, dict[str, Any]] = {}
        #: node id -> why the site is left out of this run (its data check failed: :mod:`server_app.sites`).
        self.refused: dict[int, str] = {}
        #: Whether every node seen so far is a site with its own data (the title says "site data").
        self.sites_only: bool | None = None
        self.stop_check = stop_check
        #: What the last configure hooks sent and what the last aggregate_train made of it; each
        #: hook replaces its record whole (Flower's hooks pass nothing else from one to the next).
        self._train_sent = Dispatch()
        self._evaluate_sent: Dispatch | None = None
        #: Client id -> metrics of the last client-side evaluation (:meth:`aggregate_evaluate`).
        self._evaluated: dict[str, dict[str, float]] = {}
        self._trained: TrainRecord | None = None
        #: Nodes whose message of the last exchange could not be pushed (:meth:`_exchange`).
        self._unsent: tuple[int, ...] = ()

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

    # -- sampling --------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, purpose: int) -> list[int]:
        """Wait (up to ``node-wait``) for enough nodes, then sample deterministically."""
        nodes = wait_for_nodes(
            grid,
            self.min_available_nodes,
            max(minimum, 1),
            self.cfg.node_wait,
            check=self._check_stop,
            known=self.node_clients,
            what=f"round {server_round}" + (" (client evaluation)" if purpose == 2 else ""),
        )
        nodes = [n for n in nodes if n not in self.refused]  # refused sites are never asked again
        rng = random.Random(self.cfg.seed * 100_003 + server_round * 7 + purpose)
        if not nodes:
            return []
        if self.spec.centralized:
            return [nodes[0]]
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        return sorted(rng.sample(nodes, size))

    def _dispatch(
        self,
        grid: Grid,
        server_round: int,
        config: ConfigRecord,
        kind: str,
        sample: tuple[float, int, int],
    ) -> Dispatch:
        """Sample nodes (``sample``: fraction, minimum, seed purpose), identify them, build one message per node.

        Everyone gets the same arrays, or (personal inter pools) each client its own.
        """
        fraction, minimum, purpose = sample
        node_ids = self._sample(grid, fraction, minimum, server_round, purpose)
        left_out: list[ClientOutcome] = []
        usable = self._identify(grid, node_ids, server_round, left_out)
        config["server-round"] = server_round
        messages, nbytes = [], 0
        personal = self.model.personal
        sent_arrays = {
            nid: self.model.client_arrays(self.node_clients[nid]) if personal else self.model.arrays for nid in usable
        }
        # The global arrays are encoded once and shared by every node's record (instruction_contents).
        contents = instruction_contents(sent_arrays, config, self.cfg.wire_dtype)
        for nid in usable:
            nbytes += int(contents[nid].array_records[ARRAYS].count_bytes())
            messages.append(Message(content=contents[nid], message_type=kind, dst_node_id=nid))
        return Dispatch(
            messages=tuple(messages),
            clients={nid: self.node_clients.get(nid) for nid in usable},
            arrays=sent_arrays,
            sampled=len(node_ids),
            nbytes=nbytes,
            left_out=tuple(left_out),
        )

    # -- sending and receiving ----------------------------------------------------------
    def _check_stop(self) -> None:
        reason = self.stop_check() if self.stop_check is not None else None
        if reason:
            raise RunFailed(reason)

    def _exchange(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send ``messages`` and collect the replies that arrive within ``timeout`` seconds.

        Flower's ``send_and_receive`` with two differences: while waiting it asks
        ``stop_check`` (a run whose SuperLink is gone stops now, not after the round), and
        it notes which nodes' messages could not even be pushed (``self._unsent``). Every pushed
        message gets its id set by the grid, which is how replies find their node again
        (:meth:`_node_of`).
        """
        if not messages:
            return []
        ids = list(grid.push_messages(messages))
        ids += [None] * (len(messages) - len(ids))
        self._unsent = tuple(m.metadata.dst_node_id for m, mid in zip(messages, ids) if not mid)
        pending = {str(mid) for mid in ids if mid}
        replies: list[Message] = []
        started = time.monotonic()
        deadline = started + timeout
        # A ClientLogGrid wraps the real grid: poll at the real grid's pace, report at the wrapper's.
        interval = float(getattr(getattr(grid, "grid", grid), "pull_interval", 2.0))
        every = float(getattr(grid, "every", 20.0))
        kinds = "/".join(sorted({m.metadata.message_type for m in messages}))
        next_note = started + every
        while pending:
            arrived = list(grid.pull_messages(pending))
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if now >= next_note:  # a round's local training can take minutes: say what we wait for
                log(
                    INFO,
                    "waiting for %d %s repl(y/ies), %s elapsed",
                    len(pending),
                    kinds,
                    format_duration(now - started),
                )
                next_note = now + every
            self._check_stop()
            time.sleep(max(0.0, min(interval, deadline - time.monotonic(), next_note - time.monotonic())))
        return replies

    @staticmethod
    def _node_of(reply: Message, destinations: dict[str, int]) -> int:
        """The node a reply is about.

        A reply the SuperLink makes up for a node that died carries the SuperLink's own
        node id as its source (1 in Flower 1.4x); the id of the message it answers names
        the node the server sent it to.
        """
        return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    # -- client identities ------------------------------------------------------------
    def _identify(self, grid: Grid, node_ids: list[int], server_round: int, outcomes: list[ClientOutcome]) -> list[int]:
        """Learn the client id of every node not yet known; returns the nodes that can take part.

        A node that does not answer is recorded as timed out; one that answers with an
        error or without an id, or claims the id of another node sampled in the same
        round, as rejected. Either way it is left out of the round. A site that joins after
        round 1 has its data checked like the others were before it
        (:func:`server_app.sites.site_verdicts`): refused, it is rejected now and never sampled again.
        """
        unknown = [nid for nid in node_ids if nid not in self.node_clients]
        if unknown:
            queries = [
                Message(content=identity_query(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown
            ]
            replies = self._exchange(grid, queries, self.cfg.round_timeout)
            destinations = Dispatch(messages=tuple(queries)).destinations()
            answered = set()
            for reply in replies:
                node = self._node_of(reply, destinations)
                if node not in unknown or node in answered:
                    continue
                answered.add(node)
                if reply.has_error():  # its kind (a config or data error?) is what decides whether the run can go on
                    kind, text = parse_reason(reply.error.reason)
                    outcomes.append(ClientOutcome(node, None, "rejected", f"no identity: client error: {text}", kind))
                    continue
                record, reason = parse_identity_record(reply)
                if record is None:
                    outcomes.append(ClientOutcome(node, None, "rejected", f"no identity: {one_line(reason)}"))
                    continue
                client = record["client-id"]
                verdict = self._check_site(node, client, reply)
                if verdict is not None and verdict.refused:
                    outcomes.append(ClientOutcome(node, client, "rejected", f"refused: {verdict.reason}", "data"))
                    continue
                self.node_clients[node] = client
                self.node_records[node] = record
            for node in unknown:
                if node not in answered:
                    outcomes.append(ClientOutcome(node, None, *self._silent_reason(node, "the identity query")))
        usable, seen = [], {}
        for nid in node_ids:
            client = self.node_clients.get(nid)
            if client is None:
                continue
            if client in seen:
                outcomes.append(
                    ClientOutcome(
                        nid, client, "rejected", f"client-id {client!r} is also claimed by node {seen[client]}"
                    )
                )
                continue
            seen[client] = nid
            usable.append(nid)
        if unknown:
            log(
                INFO,
                "round %d: clients of new nodes: %s",
                server_round,
                ", ".join(f"node {n} -> {self.node_clients[n]}" for n in unknown if n in self.node_clients) or "none",
            )
        return usable

    def take_verdicts(self, verdicts: Iterable[SiteVerdict]) -> None:
        """Keep the decisions made about the nodes before round 1 (refused sites are never sampled)."""
        for verdict in verdicts:
            if verdict.refused:
                self.refused[verdict.node] = verdict.reason
            self.sites_only = (self.sites_only is not False) and verdict.is_site

    def _check_site(self, node: int, client: str, reply: Message) -> SiteVerdict | None:
        """The verdict on a node met after round 1, from its identity reply (logged, kept, and in clients.json)."""
        record = reply_site_check(reply)  # one that cannot be read refuses the site, with the reason
        if record is None:
            return None
        census = {node: {"client-id": client, SITE_CHECK: record}}
        verdict = site_verdicts(
            census, labels_fingerprint=self.reference_labels, backbone_fingerprint=self.reference_fingerprint
        )[node]
        log(WARNING if verdict.refused else INFO, "%s", verdict.describe())
        self.take_verdicts([verdict])
        if verdict.refused:
            self.clients[client] = {**self.clients.get(client, {}), **verdict.record()}
        elif client not in self.clients:
            self.clients[client] = verdict.record()
        return verdict

    def _silent_reason(self, node: int, what: str) -> tuple[str, str]:
        """``(status, reason)`` of a node that gave no reply to ``what``."""
        if node in self._unsent:
            return "rejected", f"{what} could not be delivered to the SuperLink"
        return "timed-out", f"no reply to {what} within round-timeout {self.cfg.round_timeout:g}s"

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
        sample = (self.fraction_train, self.min_train_nodes, 1)
        sent = self._train_sent = self._dispatch(grid, server_round, config, MessageType.TRAIN, sample)
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
        the round was sent to ends up accepted, rejected or timed out. A reply that is an
        error (recorded as its one-line reason: exception type and message), or fails
        validation (missing or unexpected arrays, wrong dtype or shape, NaN/Inf, an absurd
        norm, usage counts that do not match the pool size, a non-positive sample count, a
        different frozen backbone) is rejected with its reason logged and recorded; a node
        that did not answer within the round timeout is recorded as timed out; the round
        aggregates the rest. With fewer than ``min-train-nodes`` valid replies the round is
        skipped and the global state kept.

        What it made of the round (outcomes, bytes, the aggregation's figures) is kept as a
        :class:`TrainRecord`.
        """
        self._trained = self._aggregate_replies(server_round, replies, self._train_sent)
        return self._trained.arrays, self._trained.metrics

    def _aggregate_replies(self, server_round: int, replies: Iterable[Message], sent: Dispatch) -> TrainRecord:
        """:meth:`aggregate_train` for the replies to ``sent``."""
        outcomes = list(sent.left_out)
        updates, received, carrying = [], 0, 0
        sent_to = sent.clients
        destinations = sent.destinations()
        answered: set[int] = set()
        claimed: dict[str, int] = {}  # client id -> the node whose reply claimed it first
        accepted_info: dict[str, dict[str, Any]] = {}
        # Nodes in id order, not arrival order: which of two nodes claiming one client id is
        # refused must not depend on which answered first.
        replies = sorted(replies, key=lambda m: self._node_of(m, destinations))
        for message in replies:
            node = self._node_of(message, destinations)
            if sent_to and node not in sent_to:
                log(
                    WARNING,
                    "round %d: ignoring a reply from node %s, which was not sent this round",
                    server_round,
                    node,
                )
                continue
            if node in answered:
                log(WARNING, "round %d: ignoring a second reply for node %s", server_round, node)
                continue
            answered.add(node)
            client = sent_to.get(node)
            if message.has_error():
                kind, text = parse_reason(message.error.reason)
                outcomes.append(ClientOutcome(node, client, "rejected", f"client error: {text}", kind))
                continue
            if ARRAYS in message.content.array_records:
                received += int(message.content.array_records[ARRAYS].count_bytes())
                carrying += 1
            update, info, reasons = self._parse_train(message, node, client, sent)
            kind = None
            if update is not None and not reasons and update.client_id in claimed:
                reasons = [f"client-id {update.client_id!r} is also claimed by node {claimed[update.client_id]}"]
            if update is not None and not reasons:  # only a reply that is valid otherwise may set the reference
                reasons = self._check_fingerprint(info) + self._check_labels(info)
                kind = "config" if reasons else None
            if reasons or update is None:
                who = client if client is not None else info.get("client-id")
                outcomes.append(ClientOutcome(node, who, "rejected", one_line("; ".join(reasons)), kind))
                continue
            claimed[update.client_id] = node
            updates.append(update)
            outcomes.append(ClientOutcome(node, update.client_id, "accepted"))
            accepted_info[update.client_id] = {
                **info,
                "node-id": node,
                "last-round": server_round,
                "state": "training",
            }
        for node, client in sent_to.items():
            if node not in answered:
                outcomes.append(ClientOutcome(node, client, *self._silent_reason(node, "the train message")))
        self._note_lost(server_round, outcomes)
        # Recorded and averaged in client order, not in the order replies arrived.
        outcomes.sort(key=lambda o: (client_order(o.client or ""), o.node))
        updates.sort(key=lambda u: client_order(u.client_id))
        self.clients.update(accepted_info)
        self._log_outcomes(server_round, outcomes)
        rejected = sum(o.status != "accepted" for o in outcomes)
        counted = {"outcomes": tuple(outcomes), "bytes_received": received, "replies_with_arrays": carrying}
        if len(updates) < self.min_train_nodes:
            log(
                WARNING,
                "round %d skipped: %d valid repl(y/ies), min-train-nodes is %d; keeping the global state",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            metrics = MetricRecord({"accepted": len(updates), "rejected": rejected})
            return TrainRecord(arrays=None, metrics=metrics, **counted)
        settings = AggregationSettings(
            max_prompts=self.cfg.inter_pool_max,
            sweeps=self.sweeps,
            seed=self.cfg.seed * 1000 + server_round,
            inter_merge=self.cfg.inter_merge,
            align_start=self.cfg.align_start,
            align_on=self.cfg.align_on,
            pfpt_steps=self.cfg.pfpt_steps,
        )
        report = self.model.aggregate(updates, settings)
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        train_loss = mean_train_loss(updates)
        metrics = {"train-loss": train_loss, "accepted": len(updates), "rejected": rejected}
        metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
        return TrainRecord(
            arrays=state_to_record(self.model.arrays),
            metrics=MetricRecord(metrics),
            skipped=False,
            report=report,
            train_loss=train_loss,
            train_examples=int(weights.sum()),
            **counted,
        )

    def _limits(self, node: int) -> ReplyLimits:
        """What a reply from ``node`` may claim: ``max-client-examples``, and the ``num-train``
        the node gave when it identified itself (if it did)."""
        known = self.node_records.get(node, {}).get("num-train")
        return ReplyLimits(max_examples=self.cfg.max_client_examples, known_train=known)

    def _parse_train(
        self, message: Message, node: int, client: str | None, sent: Dispatch
    ) -> tuple[Any, dict[str, Any], list[str]]:
        """``(update, client record, reasons)`` of one train reply: parsed, then validated."""
        update, info, reasons = parse_train_reply(
            message, sent.arrays.get(node), pools=self.spec.pools, limits=self._limits(node)
        )
        if update is None:
            return None, info, reasons
        if self.model.personal and client is not None and update.client_id != client:
            return None, info, [f"reply is from client {update.client_id!r} but node {node} identified as {client!r}"]
        expected = self.model.expected_shapes()
        reasons = validate_update(
            update, expected, self.spec.pools, self.cfg.max_update_norm, self.pattern_usage_required
        )
        return update, info, reasons

    def _note_lost(self, server_round: int, outcomes: Iterable[ClientOutcome]) -> None:
        """A client that trained before and failed or went silent this round: ``lost`` at this round (clients.json)."""
        for item in outcomes:
            entry = self.clients.get(item.client or "")
            if item.status == "accepted" or entry is None or entry.get("state") not in ("training", "lost"):
                continue
            if entry.get("state") != "lost":
                entry.update({"state": "lost", "lost-round": server_round})
            entry["reason"] = item.reason

    @staticmethod
    def _log_outcomes(server_round: int, outcomes: list[ClientOutcome]) -> None:
        """A warning for every sampled client that was rejected or timed out."""
        for item in outcomes:
            if item.status == "rejected":
                log(WARNING, "round %d: rejected reply from %s", server_round, item.describe())
        for item in outcomes:
            if item.status == "timed-out":
                log(WARNING, "round %d: timed out: %s", server_round, item.describe())

    def _check_fingerprint(self, info: dict[str, Any]) -> list[str]:
        fingerprint = info.get("backbone-fingerprint")
        if not fingerprint:
            return []
        if self.reference_fingerprint is None:
            self.reference_fingerprint = str(fingerprint)
            return []
        if fingerprint != self.reference_fingerprint:
            return [
                f"frozen backbone fingerprint {fingerprint} differs from the federation's {self.reference_fingerprint}"
            ]
        return []

    def _check_labels(self, info: dict[str, Any]) -> list[str]:
        """A client whose class list differs from the federation's would train another task."""
        labels = info.get("labels-fingerprint")
        if not labels:
            return []
        if self.reference_labels is None:
            self.reference_labels = str(labels)
            return []
        if labels != self.reference_labels:
            return [
                f"class list fingerprint {labels} differs from the federation's {self.reference_labels}: give every "
                "site and the server the same class list (run config 'classes' or the same classes.txt)"
            ]
        return []

    # -- client-side evaluation -------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled clients to evaluate, on their local validation split and their own test set, the state
        they use: the global state, with their own inter pool where the method keeps one."""
        self._evaluate_sent = None
        self._evaluated = {}
        if self.fraction_evaluate == 0.0:
            return []
        # Evaluation is best effort: a node that cannot say who it is just does not evaluate.
        sample = (self.fraction_evaluate, self.min_evaluate_nodes, 2)
        self._evaluate_sent = self._dispatch(grid, server_round, config, MessageType.EVALUATE, sample)
        return list(self._evaluate_sent.messages)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sample-weighted means of the clients' metrics: each one's validation split, and its own test set
        (``test-*``, weighted by ``test-num-examples``), evaluated with the state it was sent.

        Each reply's metrics are parsed at :func:`~fedprime_protocol.messages.parse_evaluate_reply`
        (known names, finite values in range, counts at most ``max-client-examples``); a reply
        that does not fit is logged with its reason and left out. The others are kept per client
        (by client id) for the round's record (:meth:`_client_evaluation`).
        """
        per_client: dict[str, dict[str, float]] = {}
        sent = self._evaluate_sent or Dispatch()
        destinations = sent.destinations()
        limits = ReplyLimits(max_examples=self.cfg.max_client_examples)
        seen: set[int] = set()
        for message in replies:
            node = self._node_of(message, destinations)
            if node in seen or (destinations and node not in destinations.values()):
                continue
            seen.add(node)
            if message.has_error():
                reason = parse_reason(message.error.reason)[1]
                log(WARNING, "round %d: node %s did not evaluate: %s", server_round, node, reason)
                continue
            metrics, reason = parse_evaluate_reply(message, limits)
            if metrics is None:
                if reason:
                    log(
                        WARNING,
                        "round %d: rejected evaluate reply from node %s: %s",
                        server_round,
                        node,
                        one_line(reason),
                    )
                continue
            claimed = message.content.config_records.get(CLIENT, ConfigRecord()).get("client-id")
            safe = isinstance(claimed, str) and bool(claimed) and client_id_problem(claimed) is None
            client = sent.clients.get(node) or (claimed if safe else f"node-{node}")
            if client in per_client:
                client = f"{client} (node {node})"
            per_client[client] = {k: float(v) for k, v in metrics.items()}
        # Sum in client order, not in the order the replies arrived (nor by node ids, which
        # differ between runs): the same run gives the same means, to the bit.
        self._evaluated = {c: per_client[c] for c in sorted(per_client, key=client_order)}
        # Timings (eval-seconds) stay per client; the means are of the metrics.
        rows = [{k: v for k, v in m.items() if not k.endswith("-seconds")} for m in self._evaluated.values()]
        out = weighted_means(rows, groups=("", CLIENT_TEST_PREFIX))
        if not out:
            return None
        out.setdefault(NUM_EXAMPLES, 0)
        return MetricRecord(out)

    # -- the loop ---------------------------------------------------------------------
    # Flower's own ``start`` (inherited) runs these hooks too; ``start_or_resume`` is that
    # loop with what a long federated run needs: resume, a checkpoint per round, stops.
    def start_or_resume(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        evaluate_held_out: ServerEvaluate | None = None,
    ) -> Result:
        """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start`, resumable: rounds ``len(history)+1 .. num_rounds``.

        The arguments mean what they mean to Flower's ``start``, and the hooks are called as
        it calls them. What this loop adds:

        * **resume**: rounds already in ``history`` (a resumed run's checkpoint) are neither
          repeated nor lost; ``initial_arrays`` is then the checkpointed state;
        * **a checkpoint per round**: results (metrics.json, summary, curves) and a
          checkpoint after every round, so a stopped run can be resumed;
        * **stops**: it pushes and pulls the messages itself (:meth:`_exchange`, not
          ``grid.send_and_receive``) and asks ``stop_check`` while it waits (a run whose
          SuperLink is gone stops now); it stops a run that cannot learn (below);
        * ``evaluate_held_out(round, state) -> {"val": {...}, "same-as-train": {...}, ...}``,
          FedPrime's server-side evaluation on the held-out sets, before round 1 of a fresh
          run and every ``eval-every`` rounds (and the last); nested into metrics.json, and
          from round 1 on flattened (``"val/accuracy"``) into
          ``result.evaluate_metrics_serverapp``, next to what ``evaluate_fn`` returns.

        Raises:
            RunFailed: nothing can learn (every sampled client failed with a config or data
                error, or ``max-skipped-rounds`` rounds in a row were skipped), or
                ``stop_check`` said stop (the SuperLink is gone). The round that showed it
                is saved; the summary says the run failed and why.
        """
        result = Result(arrays=initial_arrays)
        done = max((r["round"] for r in self.history), default=-1)
        title = f"{self.cfg.method} on {self.cfg.dataset} ({setting_label(self.cfg, bool(self.sites_only))})"
        self.summary()
        skipped_in_a_row = 0
        for record in reversed(self.history):
            if record["round"] == 0 or not record.get("skipped"):
                break
            skipped_in_a_row += 1
        saved = False
        try:
            if done < 0 and evaluate_held_out is not None:  # round 0: metrics.json only, as before
                record = {"round": 0, **self._held_out(0, evaluate_held_out)}
                self.history.append(record)
                self._log_eval(0, record["eval"])
                if record.get("eval-top-tau-same") is False:
                    self._log_eval(0, record["eval-top-tau"], f"the {self.cfg.tau} most popular inter centres")
                self._persist(0, title, "running" if num_rounds > 0 else "finished")
            if done < 0 and evaluate_fn is not None:
                self._server_evaluation(0, result, evaluate_fn, None)
            first = max(done, 0) + 1
            if first > num_rounds:
                log(INFO, "all %d rounds already completed in %s", num_rounds, self.run_dir)
            for server_round in range(first, num_rounds + 1):
                self._check_stop()
                started = time.perf_counter()
                messages = self.configure_train(
                    server_round, result.arrays, ConfigRecord(dict(train_config or {})), grid
                )
                sent = self._train_sent
                replies = self._exchange(grid, list(messages), timeout)
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                # The replies hold every client's arrays: not kept through evaluation and into the next round.
                del messages, replies
                trained = self._trained
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
                failure = stop_reason(list(trained.outcomes), skipped_in_a_row, self.cfg.max_skipped_rounds)
                if failure is None:
                    # Both evaluations every eval-every rounds and in the last one.
                    evaluating = not server_round % self.cfg.eval_every or server_round == num_rounds
                    if evaluating:
                        record.update(self._client_evaluation(server_round, grid, evaluate_config, result))
                    held_out = evaluate_held_out if evaluating else None
                    record.update(self._server_evaluation(server_round, result, evaluate_fn, held_out))
                record["round-seconds"] = time.perf_counter() - started
                self.history.append(record)
                self._log_round(record, num_rounds)
                if failure is not None:
                    self._persist(server_round, title, "failed", failure)
                    saved = True
                    raise RunFailed(failure)
                self._persist(server_round, title, "finished" if server_round == num_rounds else "running")
        except RunFailed as exc:
            last = max((r["round"] for r in self.history), default=0)
            log(ERROR, "FedPrime run FAILED after round %d: %s", last, exc)
            if not saved:
                # Stopped inside a round: the global state may already hold part of it, so the
                # checkpoint stays at the last completed round; only the summary changes.
                self._write_failed(title, str(exc))
            raise
        except BaseException as exc:  # a bug, an interrupt, flwr stop: the summary must not say "running"
            last = max((r["round"] for r in self.history), default=0)
            reason = self._stop_reason(exc)
            log(ERROR, "FedPrime run FAILED after round %d: %s", last, reason)
            self._write_failed(title, reason)
            raise
        result.arrays = state_to_record(self.model.arrays)
        return result

    def _client_evaluation(
        self, server_round: int, grid: Grid, evaluate_config: ConfigRecord | None, result: Result
    ) -> dict[str, Any]:
        """Client-side evaluation where configured: the round's ``bytes-sent-evaluate``, ``client-eval`` (the
        sample-weighted means) and ``client-eval-per-client`` (client id -> its metrics)."""
        messages = list(
            self.configure_evaluate(server_round, result.arrays, ConfigRecord(dict(evaluate_config or {})), grid)
        )
        fields: dict[str, Any] = {}
        if self._evaluate_sent is not None:
            fields["bytes-sent-evaluate"] = self._evaluate_sent.nbytes
        if messages:
            client_eval = self.aggregate_evaluate(server_round, self._exchange(grid, messages, self.cfg.round_timeout))
            if client_eval is not None:
                result.evaluate_metrics_clientapp[server_round] = client_eval
                fields["client-eval"] = dict(client_eval)
                fields["client-eval-per-client"] = dict(self._evaluated)
                for client, scores in self._evaluated.items():
                    if client in self.clients:  # each site's last own scores, in clients.json
                        self.clients[client]["client-val"] = {**scores, "round": server_round}
        return fields

    def _held_out(self, server_round: int, evaluate_held_out: ServerEvaluate) -> dict[str, Any]:
        """The held-out evaluation of the global state (``eval``) and, with ``server-eval-top-tau``, of the
        state a new client starts from (``eval-top-tau``).

        ``eval-top-tau``: the global state with only the ``tau`` most popular centres of the
        personal inter pool (the same size under ``align`` and ``position``). Where that is the
        same model as ``eval`` (no personal pool, or a pool of at most ``tau`` centres) it is
        neither evaluated nor written again: the record says ``eval-top-tau-same: true`` (and
        readers take ``eval``: :func:`fedprime_core.results.top_tau_evaluation`).
        """
        fields: dict[str, Any] = {"eval": evaluate_held_out(server_round, self.model.arrays)}
        if self.cfg.server_eval_top_tau:
            top = self.model.top_tau_arrays()
            fields["eval-top-tau-same"] = top is None
            if top is not None:
                fields["eval-top-tau"] = evaluate_held_out(server_round, top)
        return fields

    def _server_evaluation(
        self,
        server_round: int,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        evaluate_held_out: ServerEvaluate | None,
    ) -> dict[str, Any]:
        """Server-side evaluation: the held-out sets (the round's ``eval``) and Flower's ``evaluate_fn``.

        Both go into ``result.evaluate_metrics_serverapp`` (the held-out metrics flattened).
        """
        fields: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        if evaluate_held_out is not None:
            fields = self._held_out(server_round, evaluate_held_out)
            metrics.update({f"{s}/{k}": float(v) for s, m in fields["eval"].items() for k, v in m.items()})
            if fields.get("eval-top-tau-same") is False:
                top = fields["eval-top-tau"]
                metrics.update({f"top-tau/{s}/{k}": float(v) for s, m in top.items() for k, v in m.items()})
        if evaluate_fn is not None:
            metrics.update(evaluate_fn(server_round, result.arrays) or {})
        if metrics:
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
        return fields

    def _persist(self, server_round: int, title: str, status: str = "running", reason: str = "") -> None:
        """Results first, checkpoint last: the checkpoint's round is the last complete one.

        Raises:
            RunFailed: a file cannot be written (disk full, the folder turned read-only or
                went away); the round is taken back out of the history, since its
                checkpoint was not committed.
        """
        try:
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
                    "fingerprint": self.reference_fingerprint,
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

    def _write_failed(self, title: str, reason: str) -> None:
        """The summary of a failed run, as far as the folder can still be written (else a log line says so)."""
        try:
            write_run_outputs(
                self.run_dir,
                self.history,
                self.multilabel,
                title,
                status="failed",
                reason=reason,
                wire=describe_communication(self.cfg),
                clients=self.clients,
            )
        except OSError as exc:
            log(ERROR, "cannot write the failed status to %s either: %s", self.run_dir, exc.strerror or exc)

    def _stop_reason(self, exc: BaseException) -> str:
        """One line on why the loop ended with ``exc``, which is not a :class:`RunFailed`."""
        if isinstance(exc, KeyboardInterrupt):
            lost = self.stop_check() if self.stop_check is not None else None
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
        pools = ", ".join(f"{p} pool {r[f'{p}-pool-size']}" for p in self.spec.pools if f"{p}-pool-size" in r)
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
            metric = metric_name(self.multilabel)
            means = r["client-eval"]
            parts = [f"validation {100 * means[metric]:.1f}"] if metric in means else []
            if f"test-{metric}" in means:
                parts.append(f"own test sets {100 * means[f'test-{metric}']:.1f}")
            log(
                INFO,
                "round %d client-side %s (%%, %d clients): %s",
                r["round"],
                metric,
                len(r.get("client-eval-per-client", {})),
                ", ".join(parts) or "-",
            )


__all__ = ["Dispatch", "FedPrimeStrategy", "NotEnoughNodesError", "TrainRecord"]
