"""``FedPrimeStrategy``: the Flower Message-API strategy of every FedPrime method.

The strategy is an adapter: it samples nodes, turns reply messages into
:class:`~fedprime_core.federated.ClientUpdate` objects, validates them with
:func:`~fedprime_core.federated.validate_update` and aggregates them with
:func:`~fedprime_core.federated.aggregate_round` (inter-prompt clustering-alignment,
intra-prompt / query-map / head FedAvg). It keeps the global state, writes the results
and a checkpoint after every round, and can start from a checkpoint (resume).

Methods with personal inter pools (fedprime, fed-inter, fedprox-p) get one message per
node: the shared arrays plus that client's own ``tau`` inter prompts and keys
(:mod:`fedprime_core.interpool`). The strategy learns which client a node is with one
identity query the first time it samples the node (node ids change when a SuperNode or
a simulation restarts; client ids do not), and keeps every client's slots in the
checkpoint, so a resumed run gives every client back exactly its pool.

Arrays travel in the run's ``wire-dtype``; the strategy keeps, per node, the float32
arrays it sent, so a client's delta (``upload-delta``) is added to them, and records the
bytes it actually sent and received every round (``bytes-sent``, ``bytes-received`` and
their per-client figures in metrics.json and the summary).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from fedprime_core.config import RunConfig, config_to_dict, describe_communication, method_default_sweeps
from fedprime_core.federated import AggregationSettings, GlobalState, validate_update
from fedprime_core.methods import method_spec
from fedprime_core.results import save_checkpoint, write_json, write_run_outputs

from .messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    encode_arrays,
    identity_query,
    parse_identity_reply,
    parse_train_reply,
    state_to_record,
)

#: ``evaluate_fn(round, state) -> {"val": {...}, "same-as-train": {...}, ...}``
ServerEvaluate = Callable[[int, dict[str, np.ndarray]], dict[str, dict[str, float]]]


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected than ``min-available-nodes`` within the round timeout."""


class FedPrimeStrategy(FedAvg):
    """Aggregates FedPrime prompt pools with alignment, everything else with FedAvg.

    Subclasses Flower's Message-API :class:`~flwr.serverapp.strategy.FedAvg` for its
    sampling parameters and summary; overrides the round hooks and :meth:`start`.

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
    ) -> None:
        spec = method_spec(cfg.method)
        min_train = 1 if spec.centralized else cfg.min_train_nodes
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=min_train,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=1 if spec.centralized else cfg.min_available_nodes,
        )
        self.cfg = cfg
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.model = GlobalState.restore(spec, initial_state, inter_record, cfg.inter_merge)
        self.history: list[dict[str, Any]] = list(history or [])
        self.clients: dict[str, dict[str, Any]] = dict(clients or {})
        self.reference_fingerprint = server_fingerprint
        self.multilabel = multilabel
        self.reference_labels = labels_fingerprint
        self.sweeps = cfg.align_sweeps or method_default_sweeps(cfg.method)
        #: node id -> client id, learned by identity queries (never checkpointed: node ids change).
        self.node_clients: dict[int, str] = {}
        self._round: dict[str, Any] = {}

    # -- sampling --------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, purpose: int) -> list[int]:
        """Wait (up to the round timeout) for enough nodes, then sample deterministically."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"only {len(nodes)} node(s) connected after {self.cfg.round_timeout:.0f}s, "
                    f"min-available-nodes is {self.min_available_nodes}"
                )
            log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), self.min_available_nodes)
            time.sleep(1.0)
        rng = random.Random(self.cfg.seed * 100_003 + server_round * 7 + purpose)
        if self.spec.centralized:
            return [nodes[0]]
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        return sorted(rng.sample(nodes, size))

    def _messages(self, config: ConfigRecord, node_ids: list[int], kind: str) -> tuple[list[Message], int]:
        """One message per node (the same arrays for everyone, or each client's own inter pool) and their bytes.

        The float32 arrays sent to each node are kept in ``self._round["sent-arrays"]`` (a
        client's delta is added to them).
        """
        sent_arrays = self._round.setdefault("sent-arrays", {})
        if not self.model.personal:
            arrays = self.model.arrays
            content = RecordDict({**encode_arrays(arrays, self.cfg.wire_dtype), CONFIG: config})
            messages = [Message(content=content, message_type=kind, dst_node_id=nid) for nid in node_ids]
            sent_arrays.update({nid: arrays for nid in node_ids})
            return messages, int(content.array_records[ARRAYS].count_bytes()) * len(node_ids)
        messages, sent = [], 0
        for nid in node_ids:
            arrays = self.model.client_arrays(self.node_clients[nid])
            content = RecordDict({**encode_arrays(arrays, self.cfg.wire_dtype), CONFIG: config})
            sent += int(content.array_records[ARRAYS].count_bytes())
            sent_arrays[nid] = arrays
            messages.append(Message(content=content, message_type=kind, dst_node_id=nid))
        return messages, sent

    # -- client identities ------------------------------------------------------------
    def _identify(self, grid: Grid, node_ids: list[int], server_round: int) -> list[int]:
        """Learn the client id of every node not yet known; returns the nodes that can take part.

        A node that does not answer, answers without an id, or claims the id of another
        node sampled in the same round is left out of the round and recorded as rejected.
        """
        if not self.model.personal:
            return node_ids
        unknown = [nid for nid in node_ids if nid not in self.node_clients]
        if unknown:
            queries = [
                Message(content=identity_query(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown
            ]
            answered = set()
            for reply in grid.send_and_receive(queries, timeout=self.cfg.round_timeout):
                node = reply.metadata.src_node_id
                client, reason = parse_identity_reply(reply)
                if client is None:
                    self._reject(node, f"no identity: {reason}")
                    continue
                answered.add(node)
                self.node_clients[node] = client
            for node in set(unknown) - answered:
                self._reject(node, "no answer to the identity query within the round timeout")
        usable, seen = [], {}
        for nid in node_ids:
            client = self.node_clients.get(nid)
            if client is None:
                continue
            if client in seen:
                self._reject(nid, f"client-id {client!r} is also claimed by node {seen[client]} in this round")
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

    def _reject(self, node: int, reason: str) -> None:
        self._round.setdefault("pre-rejected", []).append({"node": node, "reason": reason})

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
        class's argument) is not used.
        """
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, purpose=1)
        self._round["sampled"] = len(node_ids)
        node_ids = self._identify(grid, node_ids, server_round)
        config["server-round"] = server_round
        self._round.pop("sent-arrays", None)
        messages, self._round["bytes-sent"] = self._messages(config, node_ids, MessageType.TRAIN)
        self._round["sent-to"] = {nid: self.node_clients.get(nid) for nid in node_ids}
        self._round["bytes-sent-per-client"] = self._round["bytes-sent"] / max(len(node_ids), 1)
        log(
            INFO,
            "configure_train: round %d, %d client(s), %.1f kB each (%s)",
            server_round,
            len(node_ids),
            self._round["bytes-sent-per-client"] / 1e3,
            self.cfg.wire_dtype,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then align inter prompts and FedAvg the rest.

        This is the Message-API successor of the legacy ``aggregate_fit`` hook. A reply
        that is an error, or fails validation (missing or unexpected arrays, wrong
        dtype or shape, NaN/Inf, an absurd norm, usage counts that do not match the pool
        size, a non-positive sample count, a different frozen backbone) is rejected with
        its reason logged and recorded; the round aggregates the rest. With fewer than
        ``min-train-nodes`` valid replies the round is skipped and the global state kept.
        """
        updates, rejected, received, carrying = [], list(self._round.pop("pre-rejected", [])), 0, 0
        sent_to = self._round.get("sent-to", {})
        sent_arrays = self._round.pop("sent-arrays", {})
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                rejected.append({"node": node, "reason": f"client error: {message.error.reason}"})
                continue
            if ARRAYS in message.content.array_records:
                received += int(message.content.array_records[ARRAYS].count_bytes())
                carrying += 1
            update, info, reasons = parse_train_reply(message, sent_arrays.get(node))
            if update is not None:
                client = sent_to.get(node)
                if self.model.personal and client is not None and update.client_id != client:
                    reasons = [f"reply is from client {update.client_id!r} but node {node} identified as {client!r}"]
                else:
                    expected = self.model.expected_shapes()
                    reasons = validate_update(update, expected, self.spec.pools, self.cfg.max_update_norm)
                    reasons += self._check_fingerprint(info)
                    reasons += self._check_labels(info)
            if reasons:
                rejected.append({"node": node, "partition": info.get("partition-id"), "reason": "; ".join(reasons)})
                continue
            updates.append(update)
            self.clients[update.client_id] = {**info, "node-id": node, "last-round": server_round}
        for item in rejected:
            log(WARNING, "round %d: rejected reply from node %s: %s", server_round, item["node"], item["reason"])
        self._round.update(
            {
                "bytes-received": received,
                "bytes-received-per-client": received / max(carrying, 1),
                "accepted": len(updates),
                "rejected": len(rejected),
                "rejected-reasons": [f"node {r['node']}: {r['reason']}" for r in rejected],
            }
        )
        if len(updates) < self.min_train_nodes:
            log(
                WARNING,
                "round %d skipped: %d valid repl(y/ies), min-train-nodes is %d; keeping the global state",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            self._round["skipped"] = True
            return None, MetricRecord({"accepted": len(updates), "rejected": len(rejected)})
        settings = AggregationSettings(
            max_prompts=self.cfg.inter_pool_max,
            sweeps=self.sweeps,
            seed=self.cfg.seed * 1000 + server_round,
            inter_merge=self.cfg.inter_merge,
        )
        report = self.model.aggregate(updates, settings)
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        train_loss = float(np.average([u.metrics.get("train-loss", np.nan) for u in updates], weights=weights))
        self._round.update(report)
        self._round.update({"train-loss": train_loss, "train-examples": int(weights.sum()), "skipped": False})
        metrics = {"train-loss": train_loss, "accepted": len(updates), "rejected": len(rejected)}
        metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
        return state_to_record(self.model.arrays), MetricRecord(metrics)

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
        """Ask sampled clients to evaluate the global state on their local validation split."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, purpose=2)
        node_ids = self._identify(grid, node_ids, server_round)
        self._round.pop("pre-rejected", None)  # evaluation is best effort: a silent node just does not evaluate
        config["server-round"] = server_round
        messages, self._round["bytes-sent-evaluate"] = self._messages(config, node_ids, MessageType.EVALUATE)
        self._round.pop("sent-arrays", None)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sample-weighted mean of the clients' local validation metrics (bad replies ignored)."""
        rows = []
        for message in replies:
            if message.has_error() or METRICS not in message.content.metric_records:
                continue
            metrics = message.content.metric_records[METRICS]
            n = metrics.get("num-examples", 0)
            values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num-examples"}
            if isinstance(n, (int, float)) and n > 0 and all(np.isfinite(list(values.values()))):
                rows.append((float(n), values))
        if not rows:
            return None
        total = sum(n for n, _ in rows)
        keys = set.intersection(*(set(v) for _, v in rows))
        out = {k: sum(n * v[k] for n, v in rows) / total for k in sorted(keys)}
        out["num-examples"] = int(total)
        return MetricRecord(out)

    # -- the loop ---------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: ServerEvaluate | None = None,
    ) -> Result:
        """Run rounds ``len(history)+1 .. num_rounds``, saving results and a checkpoint after each.

        Unlike the base loop, this one can continue a resumed run: rounds already in
        ``history`` are neither repeated nor lost. ``evaluate_fn`` returns nested metrics
        per held-out set (``val`` and the five test settings).
        """
        result = Result(arrays=initial_arrays)
        done = max((r["round"] for r in self.history), default=-1)
        title = f"{self.cfg.method} on {self.cfg.dataset} ({self.cfg.missing_setting}, eta={self.cfg.eta})"
        self.summary()
        if done < 0 and evaluate_fn is not None:
            record = {"round": 0, "eval": evaluate_fn(0, self.model.arrays)}
            self.history.append(record)
            self._log_eval(0, record["eval"])
            self._persist(0, title)
        first = max(done, 0) + 1
        if first > num_rounds:
            log(INFO, "all %d rounds already completed in %s", num_rounds, self.run_dir)
        for server_round in range(first, num_rounds + 1):
            started = time.perf_counter()
            self._round = {"round": server_round}
            replies = grid.send_and_receive(
                self.configure_train(server_round, ArrayRecord(), ConfigRecord(dict(train_config or {})), grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            eval_messages = self.configure_evaluate(
                server_round, ArrayRecord(), ConfigRecord(dict(evaluate_config or {})), grid
            )
            if eval_messages:
                client_eval = self.aggregate_evaluate(
                    server_round, grid.send_and_receive(eval_messages, timeout=timeout)
                )
                if client_eval is not None:
                    result.evaluate_metrics_clientapp[server_round] = client_eval
                    self._round["client-eval"] = dict(client_eval)
            if evaluate_fn is not None and (server_round % self.cfg.eval_every == 0 or server_round == num_rounds):
                self._round["eval"] = evaluate_fn(server_round, self.model.arrays)
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(
                    {f"{s}/{k}": float(v) for s, m in self._round["eval"].items() for k, v in m.items()}
                )
            self._round["round-seconds"] = time.perf_counter() - started
            self._round.pop("sent-to", None)
            self._round.pop("sent-arrays", None)
            self.history.append(dict(self._round))
            self._log_round(server_round, num_rounds)
            self._persist(server_round, title)
        result.arrays = state_to_record(self.model.arrays)
        return result

    def _persist(self, server_round: int, title: str) -> None:
        """Results first, checkpoint last: the checkpoint's round is the last complete one."""
        write_run_outputs(self.run_dir, self.history, self.multilabel, title, describe_communication(self.cfg))
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

    def _log_eval(self, server_round: int, evaluation: dict[str, dict[str, float]]) -> None:
        metric = "macro_f1" if self.multilabel else "accuracy"
        parts = ", ".join(f"{name} {100 * m.get(metric, float('nan')):.1f}" for name, m in evaluation.items())
        log(INFO, "round %d server-side %s (%%): %s", server_round, metric, parts)

    def _log_round(self, server_round: int, num_rounds: int) -> None:
        r = self._round
        pools = ", ".join(f"{p} pool {r[f'{p}-pool-size']}" for p in self.spec.pools if f"{p}-pool-size" in r)
        log(
            INFO,
            "[round %d/%d] %s train-loss %s | clients %s accepted, %s rejected | %s | %.1fs",
            server_round,
            num_rounds,
            "SKIPPED" if r.get("skipped") else "",
            f"{r['train-loss']:.4f}" if "train-loss" in r else "-",
            r.get("accepted", 0),
            r.get("rejected", 0),
            pools or "no retrieval pools",
            r["round-seconds"],
        )
        if "eval" in r:
            self._log_eval(server_round, r["eval"])


__all__ = ["FedPrimeStrategy", "NotEnoughNodesError"]
