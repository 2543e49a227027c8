"""What a round's replies amount to: every sampled node accepted, rejected or timed out, and why.

:meth:`ReplyAccounting.train` reads a round's train replies against what was sent
(a :class:`~server_app.transport.Dispatch`): a reply that is an error, fails to parse
(:func:`~fedprime_protocol.messages.parse_train_reply`) or to validate
(:func:`~fedprime_core.method.federated.validate_update`), claims another node's client id,
or was made with another frozen backbone or class list is rejected with its reason; a node
that did not answer is timed out. The valid updates come back in client order, whatever the
order the replies arrived in. :meth:`ReplyAccounting.evaluate` does the same for the metrics of
a client-side evaluation. :class:`TrainRecord` is what the strategy made of a train round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log

from fedprime_core.config import RunConfig
from fedprime_core.failures import ClientOutcome, one_line, parse_reason
from fedprime_core.method.federated import ClientUpdate, GlobalState, client_id_problem, client_order, validate_update
from fedprime_core.method.methods import MethodSpec
from fedprime_protocol.messages import ARRAYS, CLIENT, EVALUATION, METRICS, parse_evaluate_reply, parse_train_reply
from fedprime_protocol.replies import ReplyLimits

from .identities import NodeIdentities
from .transport import Dispatch, Transport, node_of


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


@dataclass(frozen=True, slots=True)
class TrainTally:
    """A round's train replies, accounted for.

    Attributes:
        outcomes: every node sent to (and every one left out before sending), in client order.
        updates: the valid updates, in client order.
        bytes_received: bytes of the arrays of the replies that carried any.
        replies_with_arrays: how many replies carried arrays.
    """

    outcomes: tuple[ClientOutcome, ...]
    updates: tuple[ClientUpdate, ...]
    bytes_received: int
    replies_with_arrays: int

    @property
    def rejected(self) -> int:
        """Nodes not accepted (rejected or timed out)."""
        return sum(o.status != "accepted" for o in self.outcomes)


class ReplyAccounting:
    """Reads replies into outcomes and valid updates; keeps each client's record (``clients.json``) current.

    Args:
        cfg: the run configuration (``max-client-examples``, ``max-update-norm``, the merge regime).
        spec: the method (its pools).
        model: the global state (the shapes a reply must have, whether pools are personal).
        identities: the nodes' clients and records, and the federation's fingerprints.
        transport: which nodes' messages could not be delivered.
        clients: client id -> its record; accepted and lost clients are written into it.
    """

    def __init__(
        self,
        cfg: RunConfig,
        spec: MethodSpec,
        model: GlobalState,
        identities: NodeIdentities,
        transport: Transport,
        clients: dict[str, dict[str, Any]],
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.model = model
        self.identities = identities
        self.transport = transport
        self.clients = clients
        #: Pools whose pattern-usage table a reply must carry (the alignment compares retrieval profiles).
        self.pattern_usage_required = (
            tuple(spec.personalised_pools) if cfg.inter_merge == "align" and cfg.align_on == "usage" else ()
        )

    def train(self, server_round: int, replies: Iterable[Message], sent: Dispatch) -> TrainTally:
        """Every node of ``sent`` accepted, rejected or timed out, and the valid updates, in client order.

        Accepted clients are recorded as training (``clients.json``); one that trained before
        and failed or went silent now, as lost. A warning is logged for every node not accepted.
        """
        outcomes = list(sent.left_out)
        updates, received, carrying = [], 0, 0
        sent_to = sent.clients
        destinations = sent.destinations()
        answered: set[int] = set()
        claimed: dict[str, int] = {}  # client id -> the node whose reply claimed it first
        accepted_info: dict[str, dict[str, Any]] = {}
        # Nodes in id order, not arrival order: which of two nodes claiming one client id is
        # refused must not depend on which answered first.
        replies = sorted(replies, key=lambda m: node_of(m, destinations))
        for message in replies:
            node = node_of(message, destinations)
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
                reasons = self.identities.reference_problems(info)
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
                outcomes.append(ClientOutcome(node, client, *self.transport.silent_reason(node, "the train message")))
        self._note_lost(server_round, outcomes)
        # Recorded and averaged in client order, not in the order replies arrived.
        outcomes.sort(key=lambda o: (client_order(o.client or ""), o.node))
        updates.sort(key=lambda u: client_order(u.client_id))
        self.clients.update(accepted_info)
        log_outcomes(server_round, outcomes)
        return TrainTally(tuple(outcomes), tuple(updates), received, carrying)

    def evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
        sent: Dispatch,
        carried: frozenset[str] = frozenset(),
    ) -> dict[str, dict[str, float]]:
        """Client id -> its metrics, in client order, of the evaluate replies to ``sent`` that parse.

        Each reply's metrics are parsed at :func:`~fedprime_protocol.messages.parse_evaluate_reply`
        (known names, finite values in range, counts at most ``max-client-examples`` and at most
        the ``num-val`` / ``num-test`` the node gave when it identified itself); a reply
        that does not fit, or is an error, is logged with its reason and left out. A node the
        server does not know names itself by its claimed client id (if safe) or ``node-<id>``.
        ``carried``: ids of train messages of ``sent`` that asked to evaluate first; their
        replies hold the evaluation in the ``"evaluation"`` record (the rest of such a reply
        is the train reply's business: :meth:`train`).
        """
        per_client: dict[str, dict[str, float]] = {}
        destinations = sent.destinations()
        seen: set[int] = set()
        for message in replies:
            node = node_of(message, destinations)
            if node in seen or (destinations and node not in destinations.values()):
                continue
            seen.add(node)
            if message.has_error():
                reason = parse_reason(message.error.reason)[1]
                log(WARNING, "round %d: node %s did not evaluate: %s", server_round, node, reason)
                continue
            inside_train = message.metadata.reply_to_message_id in carried
            metrics, reason = parse_evaluate_reply(
                message, self._limits(node), record_name=EVALUATION if inside_train else METRICS
            )
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
        return {c: per_client[c] for c in sorted(per_client, key=client_order)}

    def _limits(self, node: int) -> ReplyLimits:
        """What a reply from ``node`` may claim: ``max-client-examples``, and the ``num-train``,
        ``num-val`` and ``num-test`` the node gave when it identified itself (those it gave)."""
        known = self.identities.known_counts(node)
        return ReplyLimits(
            max_examples=self.cfg.max_client_examples,
            known_train=known.get("num-train"),
            known_val=known.get("num-val"),
            known_test=known.get("num-test"),
        )

    def _parse_train(
        self, message: Message, node: int, client: str | None, sent: Dispatch
    ) -> tuple[Any, dict[str, Any], list[str]]:
        """``(update, client record, reasons)`` of one train reply: parsed, then validated."""
        update, info, reasons = parse_train_reply(
            message, sent.arrays.get(node), pools=self.spec.pools, limits=self._limits(node)
        )
        if update is None:
            return None, info, reasons
        # Every method: a node answers for the client it identified as. A reply naming another client
        # would otherwise take that client's place (its slot in clients.json, its personal pools, and
        # the rejection of the honest node when both replied). centralized-p's one owner holds all the
        # data and names itself "centralized", whatever its node config said: nobody to stand in for.
        if client is not None and update.client_id != client and not self.spec.centralized:
            return None, info, [f"reply is from client {update.client_id!r} but node {node} identified as {client!r}"]
        expected = self.model.expected_shapes()
        reasons = validate_update(
            update,
            expected,
            self.spec.pools,
            self.cfg.max_update_norm,
            self.pattern_usage_required,
            max_uses_per_example=self.cfg.local_epochs * self.cfg.kappa,
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


def log_outcomes(server_round: int, outcomes: Iterable[ClientOutcome]) -> None:
    """A warning for every sampled client that was rejected or timed out."""
    outcomes = list(outcomes)
    for item in outcomes:
        if item.status == "rejected":
            log(WARNING, "round %d: rejected reply from %s", server_round, item.describe())
    for item in outcomes:
        if item.status == "timed-out":
            log(WARNING, "round %d: timed out: %s", server_round, item.describe())
