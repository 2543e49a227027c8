"""Before round 1: who is connected, which sites can train, and whether the run can start.

:func:`node_census` asks every connected node who it is (one identity query each; a site
answers with its data check), :func:`admit_sites` logs one line per site and starts without
the refused ones or stops the run (:mod:`server_app.sites` decides each site's verdict), and
:func:`partition_count` checks that partitioned nodes agree on how the run's data is split.
"""

from __future__ import annotations

from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprime_core.config import ConfigError, RunConfig
from fedprime_core.failures import RunFailed, one_line, parse_reason
from fedprime_core.method.methods import method_spec
from fedprime_core.results import write_json, write_run_outputs
from fedprime_protocol.logs import mark_reported
from fedprime_protocol.messages import SITE_CHECK, identity_query, parse_identity_record

from .nodes import wait_for_nodes
from .sites import SiteVerdict, refusal_stops_run, reply_site_check
from .watchdog import SuperLinkWatchdog


def cannot_start(exc: BaseException) -> None:
    """Log why the run cannot start as the ServerApp's last line (Flower then adds no traceback for it)."""
    log(ERROR, "FedPrime cannot start: %s", exc)
    mark_reported(exc)


def node_census(
    grid: Grid, cfg: RunConfig, watchdog: SuperLinkWatchdog | None = None
) -> tuple[dict[int, dict[str, Any]], dict[int, tuple[str | None, str]]]:
    """Ask every connected node who it is, and every site whether its data can be trained on.

    Waits up to ``node-wait`` for ``min-available-nodes`` nodes (as round 1 would),
    then sends one identity query to each and keeps the answers that arrive within
    ``round-timeout``: the client id (and partition and partition count when it has them)
    and, from a site, its data check under ``"site-check"`` (a site loads what training
    needs to answer it: :func:`fedprime_core.runtime.site_check`).

    Returns:
        ``(census, failed)``: node id -> its identity record; node id -> ``(kind, reason)``
        of the nodes that answered with an error (:func:`server_app.sites.site_verdicts`
        refuses those with a config or data error). Nodes that do not answer are left out:
        the rounds account for them.

    Raises:
        NotEnoughNodesError: fewer than ``min-train-nodes`` nodes when ``node-wait`` ended.
        RunFailed: the SuperLink went away while waiting.
    """
    centralized = method_spec(cfg.method).centralized
    needed, enough = (1, 1) if centralized else (cfg.min_available_nodes, cfg.min_train_nodes)  # as the strategy counts
    check = watchdog.check if watchdog is not None else None
    nodes = wait_for_nodes(grid, needed, enough, cfg.node_wait, check, what="round 1")
    if not nodes:
        return {}, {}
    queries = [Message(content=identity_query(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    census: dict[int, dict[str, Any]] = {}
    failed: dict[int, tuple[str | None, str]] = {}
    for reply in grid.send_and_receive(queries, timeout=cfg.round_timeout):
        node = reply.metadata.src_node_id
        if node not in nodes or node in census:
            continue
        if reply.has_error():
            failed[node] = parse_reason(reply.error.reason)
            continue
        record, reason = parse_identity_record(reply)
        if record is None:  # the rounds account for it; one bad node must not stop the run here
            log(WARNING, "node %s gave no usable identity: %s", node, one_line(reason))
            continue
        census[node] = record
        check = reply_site_check(reply)  # one that cannot be read refuses the site, with the reason
        if check is not None:
            census[node][SITE_CHECK] = check
    log(INFO, "nodes before round 1: %d connected, %d answered the identity query", len(nodes), len(census))
    return census, failed


def admit_sites(
    cfg: RunConfig,
    grid: Grid,
    run_dir: Path,
    verdicts: dict[int, SiteVerdict],
    multilabel: bool,
    clients: dict[str, Any],
) -> None:
    """Log one line per site (its data, or why it is refused), then start without the refused ones, or stop.

    Refused sites go into ``clients`` (``clients.json``) with their reasons. When too few
    nodes remain for ``min-train-nodes`` the run stops before round 1: summary.md and
    clients.json say which sites were refused and why.

    Raises:
        RunFailed: too few nodes can train.
    """
    for verdict in sorted(verdicts.values(), key=lambda v: v.client):
        if verdict.is_site:
            log(WARNING if verdict.refused else INFO, "%s", verdict.describe())
            for line in verdict.check.get("warnings", []) or []:
                log(WARNING, "client %s | %s", verdict.client, line)
        if verdict.refused:
            clients[verdict.client] = {**clients.get(verdict.client, {}), **verdict.record()}
        elif verdict.is_site and verdict.client not in clients:
            clients[verdict.client] = verdict.record()  # checked; training will replace it
    centralized = method_spec(cfg.method).centralized
    min_train, min_available = (1, 1) if centralized else (cfg.min_train_nodes, cfg.min_available_nodes)
    stop, warning = refusal_stops_run(verdicts, grid.get_node_ids(), min_train, min_available)
    if warning:
        log(WARNING, "%s", warning)
    if stop:
        write_json(run_dir / "clients.json", clients)
        write_run_outputs(
            run_dir, [], multilabel, f"{cfg.method} on {cfg.dataset}", status="failed", reason=stop, clients=clients
        )
        failure = RunFailed(stop)
        cannot_start(failure)
        raise failure


def partition_count(census: dict[int, dict[str, Any]]) -> int | None:
    """How many partitions the partitioned nodes split the run's data into (``None``: no such node).

    Raises:
        ConfigError: the nodes disagree.
    """
    counts: dict[int, list[int]] = {}
    for node, info in census.items():
        if "num-partitions" in info:
            counts.setdefault(int(info["num-partitions"]), []).append(node)
    if len(counts) > 1:
        raise ConfigError(
            "the SuperNodes disagree on num-partitions: "
            + "; ".join(f"{n} (nodes {', '.join(map(str, sorted(nodes)))})" for n, nodes in sorted(counts.items()))
            + "; start every partitioned SuperNode with the same num-partitions"
        )
    return next(iter(counts), None)
