"""How the server reaches its nodes: sampling, one message per node, and an exchange that can stop.

:class:`Transport` is Flower's ``grid.send_and_receive`` with what a long run needs: it asks
``stop_check`` while it waits (a run whose SuperLink is gone stops now, not after the round),
notes which messages could not even be pushed (:meth:`Transport.silent_reason` tells those
apart from nodes that were silent), and says what it is waiting for. It also waits for
enough nodes and samples them deterministically (:meth:`Transport.sample`).

:class:`Dispatch` is what a configure hook sent: the messages, each node's client and the
float32 arrays it was sent (a reply finds its node through the message it answers:
:func:`node_of`). A round's messages share one encoding of the global arrays
(:func:`~fedprime_protocol.messages.instruction_contents`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprime_core.config import RunConfig
from fedprime_core.failures import ClientOutcome, RunFailed
from fedprime_core.progress import format_duration
from fedprime_protocol.messages import ARRAYS, instruction_contents

from .nodes import wait_for_nodes

#: Seconds between the server's pulls for replies on a real grid (one small RPC to the SuperLink
#: each): a reply waits half of it on average, twice per round (train, evaluate). Flower's own
#: ``send_and_receive`` sleeps 3 s; 2 s cost about 2 s per round in deployment (issue 28).
PULL_INTERVAL = 0.25

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


def build_dispatch(
    kind: str,
    config: ConfigRecord,
    arrays: Mapping[int, Mapping[str, np.ndarray]],
    clients: Mapping[int, str | None],
    wire_dtype: str,
    *,
    sampled: int,
    left_out: tuple[ClientOutcome, ...] = (),
) -> Dispatch:
    """One ``kind`` message per node of ``arrays`` (node id -> the float32 arrays it gets), in that order.

    The global arrays are encoded once and shared by every node's record
    (:func:`~fedprime_protocol.messages.instruction_contents`).
    """
    contents = instruction_contents(arrays, config, wire_dtype)
    messages, nbytes = [], 0
    for nid in arrays:
        nbytes += int(contents[nid].array_records[ARRAYS].count_bytes())
        messages.append(Message(content=contents[nid], message_type=kind, dst_node_id=nid))
    return Dispatch(
        messages=tuple(messages),
        clients=dict(clients),
        arrays=arrays,
        sampled=sampled,
        nbytes=nbytes,
        left_out=left_out,
    )


def node_of(reply: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply is about.

    A reply the SuperLink makes up for a node that died carries the SuperLink's own
    node id as its source (1 in Flower 1.4x); the id of the message it answers names
    the node the server sent it to.
    """
    return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class Transport:
    """Sends messages to nodes and collects their replies, stopping when ``stop_check`` says so.

    Args:
        cfg: the run configuration (``seed``, ``node-wait``, ``round-timeout``).
        centralized: the method trains on one node only (``centralized-p``).
        stop_check: asked while waiting; a reason it returns stops the run
            (:class:`~fedprime_core.failures.RunFailed`).
    """

    def __init__(self, cfg: RunConfig, *, centralized: bool = False, stop_check: StopCheck | None = None) -> None:
        self.cfg = cfg
        self.centralized = centralized
        self.stop_check = stop_check
        #: Nodes whose message of the last exchange could not be pushed (:meth:`exchange`).
        self.unsent: tuple[int, ...] = ()

    @property
    def round_timeout(self) -> float:
        return self.cfg.round_timeout

    def check_stop(self) -> None:
        """Raise :class:`~fedprime_core.failures.RunFailed` when ``stop_check`` gives a reason."""
        reason = self.stop_check() if self.stop_check is not None else None
        if reason:
            raise RunFailed(reason)

    def sample(
        self,
        grid: Grid,
        fraction: float,
        minimum: int,
        min_available: int,
        server_round: int,
        purpose: int,
        *,
        known: Mapping[int, str],
        excluded: Mapping[int, str],
    ) -> list[int]:
        """Wait (up to ``node-wait``) for enough nodes, then sample deterministically.

        ``purpose`` (1: train, 2: client evaluation) seeds the draw with the round; nodes in
        ``excluded`` (refused sites) are never sampled; ``known`` (node -> client) names the
        nodes the wait reports.
        """
        nodes = wait_for_nodes(
            grid,
            min_available,
            max(minimum, 1),
            self.cfg.node_wait,
            check=self.check_stop,
            known=known,
            what=f"round {server_round}" + (" (client evaluation)" if purpose == 2 else ""),
        )
        nodes = [n for n in nodes if n not in excluded]  # refused sites are never asked again
        rng = random.Random(self.cfg.seed * 100_003 + server_round * 7 + purpose)
        if not nodes:
            return []
        if self.centralized:
            return [nodes[0]]
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        return sorted(rng.sample(nodes, size))

    def exchange(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send ``messages`` and collect the replies that arrive within ``timeout`` seconds.

        Flower's ``send_and_receive`` with two differences: while waiting it asks
        ``stop_check`` (a run whose SuperLink is gone stops now, not after the round), and
        it notes which nodes' messages could not even be pushed (:attr:`unsent`). Every pushed
        message gets its id set by the grid, which is how replies find their node again
        (:func:`node_of`).
        """
        if not messages:
            return []
        ids = list(grid.push_messages(messages))
        ids += [None] * (len(messages) - len(ids))
        self.unsent = tuple(m.metadata.dst_node_id for m, mid in zip(messages, ids) if not mid)
        pending = {str(mid) for mid in ids if mid}
        replies: list[Message] = []
        started = time.monotonic()
        deadline = started + timeout
        # A ClientLogGrid wraps the real grid: poll at the real grid's pace, report at the wrapper's.
        interval = float(getattr(getattr(grid, "grid", grid), "pull_interval", PULL_INTERVAL))
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
            self.check_stop()
            time.sleep(max(0.0, min(interval, deadline - time.monotonic(), next_note - time.monotonic())))
        return replies

    def silent_reason(self, node: int, what: str) -> tuple[str, str]:
        """``(status, reason)`` of a node that gave no reply to ``what`` in the last exchange."""
        if node in self.unsent:
            return "rejected", f"{what} could not be delivered to the SuperLink"
        return "timed-out", f"no reply to {what} within round-timeout {self.round_timeout:g}s"
