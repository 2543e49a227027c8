"""A client's identity from its node config: light enough for a ClientApp that imports no torch.

The client-id rules (:func:`client_id_problem`), :func:`client_identity` and :class:`ClientNode` (who a
ClientApp is and where its data comes from) live here (the id rules re-exported by
:mod:`fedprime_core.method.federated`) so that a ClientApp that hands its work to a site's resident
worker (:mod:`fedprime_core.site_worker`) can name itself without importing the method's modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

#: Longest client id.
MAX_CLIENT_ID_CHARS = 64
#: What a client id may hold: ASCII letters, digits and ``. _ - @ +``, starting with a letter or
#: digit. It names files' entries, log lines and sort keys; nothing else reaches them.
CLIENT_ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@+-]{{0,{MAX_CLIENT_ID_CHARS - 1}}}")


def client_id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a client id (``None`` when it can): see :data:`CLIENT_ID_PATTERN`."""
    if not isinstance(value, str):
        return f"a client id must be a string, got {type(value).__name__}"
    if CLIENT_ID_PATTERN.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        return (
            f"client id {shown!r} must be 1-{MAX_CLIENT_ID_CHARS} ASCII letters, digits and '._-@+', "
            "starting with a letter or digit"
        )
    return None


def client_identity(node_config: Mapping[str, Any], node_id: int) -> str:
    """The stable id under which the server keeps a client's state (its personal prompt pool, clients.json).

    The node config's ``client-id`` when given (a site's chosen name), else its
    ``partition-id`` (simulation and partitioned deployments), else ``node-<node id>``
    (stable for as long as the SuperNode runs). The server accepts only ids that
    :func:`client_id_problem` finds nothing wrong with.
    """
    explicit = node_config.get("client-id")
    if explicit not in (None, ""):
        return str(explicit)
    if "partition-id" in node_config:
        return str(int(node_config["partition-id"]))
    return f"node-{node_id}"


@dataclasses.dataclass(frozen=True)
class ClientNode:
    """Who a ClientApp is and where its data comes from (read from its SuperNode's node config).

    Attributes:
        client_id: the client's identity: node config ``client-id``, else ``str(partition-id)``,
            else ``node-<node id>``; keys its results (``clients.json``) and, for a site,
            its seeds and missing-table entry.
        partition_id, num_partitions: the shard of the run's data-dir (partitioned mode).
        data_dir: the site's own data folder; set, the client is site-local.
        data_layout, device: this node's overrides of the run config keys ('' keeps them).
    """

    client_id: str
    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str = ""
    data_layout: str = ""
    device: str = ""

    @property
    def site_local(self) -> bool:
        return bool(self.data_dir)

    @property
    def seed_key(self) -> int:
        """This client's part of every seed: partition id + 1, or a stable hash of a site's id."""
        if not self.site_local and self.partition_id is not None:
            return self.partition_id + 1
        return int.from_bytes(hashlib.sha256(self.client_id.encode()).digest()[:4], "big")

    def describe(self) -> dict[str, Any]:
        """The identity fields of the client-info record, as the node knows them before it loads any data.

        ``client-id``, and ``partition-id`` and ``num-partitions`` for a partitioned node:
        the server's answer to "who are you" (``fedprime_protocol.messages.identity_query``).
        The record of a train reply is :meth:`ClientShard.describe` (same identity fields)
        plus the shard's counts.
        """
        out: dict[str, Any] = {"client-id": self.client_id}
        if self.partition_id is not None and self.num_partitions is not None:
            out.update({"partition-id": self.partition_id, "num-partitions": self.num_partitions})
        return out
