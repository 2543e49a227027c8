"""Who each node is: the client behind a node id, its identity record, and the site checks.

Node ids change when a SuperNode or a simulation restarts; client ids do not. The server
learns which client a node is with one identity query the first time it samples the node
(:meth:`NodeIdentities.identify`), keeps the typed record the node gave (its ``num-train``
bounds what its replies may claim), and checks a site that joins after round 1 as the census
checked the others before it (:mod:`server_app.sites`). It also holds the federation's
references, the frozen backbone's and the class list's fingerprints: a reply made with
another backbone or class list would train another model or another task
(:meth:`NodeIdentities.reference_problems`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprime_core.failures import ClientOutcome, one_line, parse_reason
from fedprime_protocol.messages import SITE_CHECK, identity_query, parse_identity_record

from .sites import SiteVerdict, reply_site_check, site_verdicts
from .transport import Dispatch, Transport, node_of

#: The sample counts a node's identity (or its site's data check) gives, which bound its later replies.
COUNT_FIELDS = ("num-train", "num-val", "num-test")


def checked_counts(check: Mapping[str, Any] | None) -> dict[str, int]:
    """The sample counts of a site's passed data check (typed by the protocol's schema); none otherwise."""
    if not isinstance(check, Mapping) or check.get("ok") is not True:
        return {}
    return {k: check[k] for k in COUNT_FIELDS if isinstance(check.get(k), int) and not isinstance(check.get(k), bool)}


class NodeIdentities:
    """The clients behind the node ids, the sites refused, and the federation's fingerprints.

    Args:
        transport: how identity queries are sent (and which nodes were silent).
        clients: client id -> its record (``clients.json``); a site checked or refused here
            is written into it. Shared with the strategy, which writes training outcomes.
        backbone_fingerprint: the server's frozen backbone fingerprint (``None``: the first
            reply that carries one sets it).
        labels_fingerprint: the server's class list fingerprint (``None``: likewise).
    """

    def __init__(
        self,
        transport: Transport,
        clients: dict[str, dict[str, Any]],
        *,
        backbone_fingerprint: str | None = None,
        labels_fingerprint: str | None = None,
    ) -> None:
        self.transport = transport
        self.clients = clients
        self.reference_fingerprint = backbone_fingerprint
        self.reference_labels = labels_fingerprint
        #: node id -> client id, learned by identity queries (never checkpointed: node ids change).
        self.node_clients: dict[int, str] = {}
        #: node id -> its typed identity record (:func:`~fedprime_protocol.messages.parse_identity_record`).
        self.node_records: dict[int, dict[str, Any]] = {}
        #: node id -> why the site is left out of this run (its data check failed: :mod:`server_app.sites`).
        self.refused: dict[int, str] = {}
        #: Whether every node seen so far is a site with its own data (the title says "site data").
        self.sites_only: bool | None = None

    def learn_census(self, census: Mapping[int, Mapping[str, Any]]) -> None:
        """Keep what the nodes said before round 1 (:func:`server_app.census.node_census`): clients and records
        (a site's with the sample counts its data check found, which bound what its replies may claim)."""
        self.node_clients.update({node: str(info["client-id"]) for node, info in census.items() if "client-id" in info})
        self.node_records.update(
            {
                node: {**{k: v for k, v in info.items() if k != SITE_CHECK}, **checked_counts(info.get(SITE_CHECK))}
                for node, info in census.items()
            }
        )

    def identify(self, grid: Grid, node_ids: list[int], server_round: int, outcomes: list[ClientOutcome]) -> list[int]:
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
            replies = self.transport.exchange(grid, queries, self.transport.round_timeout)
            destinations = Dispatch(messages=tuple(queries)).destinations()
            answered = set()
            for reply in replies:
                node = node_of(reply, destinations)
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
                check = reply_site_check(reply)  # one that cannot be read refuses the site, with the reason
                verdict = self._check_site(node, client, check)
                if verdict is not None and verdict.refused:
                    outcomes.append(ClientOutcome(node, client, "rejected", f"refused: {verdict.reason}", "data"))
                    continue
                self.node_clients[node] = client
                self.node_records[node] = {**record, **checked_counts(check)}
            for node in unknown:
                if node not in answered:
                    status, reason = self.transport.silent_reason(node, "the identity query")
                    outcomes.append(ClientOutcome(node, None, status, reason))
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

    def _check_site(self, node: int, client: str, check: dict[str, Any] | None) -> SiteVerdict | None:
        """The verdict on a node met after round 1, from the data check it sent with its identity
        (:func:`~server_app.sites.reply_site_check`; ``None``: no site); logged, kept, and in clients.json."""
        if check is None:
            return None
        census = {node: {"client-id": client, SITE_CHECK: check}}
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

    def known_train(self, node: int) -> int | None:
        """The ``num-train`` ``node`` gave when it identified itself (``None``: it did not say)."""
        return self.node_records.get(node, {}).get("num-train")

    def known_counts(self, node: int) -> dict[str, int]:
        """``num-train``, ``num-val`` and ``num-test`` as ``node`` gave them when it identified itself (if it did)."""
        record = self.node_records.get(node, {})
        return {k: record[k] for k in COUNT_FIELDS if isinstance(record.get(k), int)}

    def reference_problems(self, info: Mapping[str, Any]) -> list[str]:
        """Why a reply's client record (``info``) does not fit the federation: another frozen backbone or
        another class list. The first record that carries a fingerprint the server lacks sets it."""
        return self._check_fingerprint(info) + self._check_labels(info)

    def _check_fingerprint(self, info: Mapping[str, Any]) -> list[str]:
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

    def _check_labels(self, info: Mapping[str, Any]) -> list[str]:
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
