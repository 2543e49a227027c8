"""The ServerApp's bounded wait for connected nodes, shared by the pre-round-1 census and every round.

A deployment loses SuperNodes: a site goes down, a machine reboots. A round needs
``min-available-nodes`` connected nodes; the wait for them is bounded by ``node-wait``
seconds (not the hour-long ``round-timeout``). When the wait ends the server goes on with
the nodes it has if they are at least ``min-train-nodes`` (a round with fewer valid replies
would be skipped anyway), and otherwise stops the run with a message naming the settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprime_core.failures import RunFailed

#: Seconds between two "Waiting for nodes" lines.
NOTE_EVERY = 10.0


class NotEnoughNodesError(RunFailed):
    """Fewer nodes connected than the round can go on with when ``node-wait`` ended."""


def wait_for_nodes(
    grid: Grid,
    needed: int,
    enough: int,
    node_wait: float,
    check: Callable[[], None] | None = None,
    known: Mapping[int, str] | None = None,
    what: str = "the next round",
    poll: float = 1.0,
) -> list[int]:
    """The sorted ids of the connected nodes, once ``needed`` are connected or ``node_wait`` ended.

    Args:
        grid: the run's grid (``get_node_ids`` is asked every ``poll`` seconds).
        needed: nodes wanted (``min-available-nodes``).
        enough: fewest nodes to go on with when the wait ends (``min-train-nodes``).
        node_wait: seconds to wait for ``needed`` nodes.
        check: called while waiting; raises to stop the run (its SuperLink is gone).
        known: node id -> client id of nodes seen before, to name the missing ones.
        what: what the wait is for, for the log lines.
        poll: seconds between two looks at the connected nodes.

    Raises:
        NotEnoughNodesError: fewer than ``enough`` nodes connected when ``node_wait`` ended.
    """
    started = time.monotonic()
    next_note = started
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        waited = time.monotonic() - started
        if waited >= node_wait:
            missing = _missing(nodes, known)
            if len(nodes) >= max(enough, 1):
                log(
                    WARNING,
                    "waited %.0fs (node-wait) for %d nodes (min-available-nodes) before %s; going on with the "
                    "%d connected (min-train-nodes is %d)%s",
                    waited,
                    needed,
                    what,
                    len(nodes),
                    enough,
                    missing,
                )
                return nodes
            raise NotEnoughNodesError(
                f"only {len(nodes)} node(s) connected after {node_wait:g}s (node-wait) before {what}; "
                f"min-available-nodes is {needed} and at least min-train-nodes = {enough} are needed to go on"
                f"{missing}. Start the missing SuperNodes and resume the run, or lower min-available-nodes / "
                "min-train-nodes."
            )
        if check is not None:
            check()
        if time.monotonic() >= next_note:
            log(
                INFO,
                "Waiting for nodes before %s: %d connected, %d required (min-available-nodes); "
                "going on with at least %d after %.0fs more (node-wait)%s",
                what,
                len(nodes),
                needed,
                max(enough, 1),
                max(node_wait - waited, 0.0),
                _missing(nodes, known),
            )
            next_note = time.monotonic() + NOTE_EVERY
        time.sleep(poll)
    return nodes


def _missing(nodes: list[int], known: Mapping[int, str] | None) -> str:
    """``"; not connected: client 2 (node 77)"`` for clients seen before and not connected now, else ``""``.

    A client whose SuperNode came back under a new node id is connected, not missing.
    """
    known = known or {}
    here = {known[nid] for nid in nodes if nid in known}
    gone = sorted((cid, nid) for nid, cid in known.items() if nid not in nodes and cid not in here)
    if not gone:
        return ""
    return "; not connected: " + ", ".join(f"client {cid} (node {nid})" for cid, nid in gone)


__all__ = ["NotEnoughNodesError", "wait_for_nodes"]
