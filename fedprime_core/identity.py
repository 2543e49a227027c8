"""A client's identity from its node config: light enough for a ClientApp that imports no torch.

:func:`client_identity` lives here (and is re-exported by :mod:`fedprime_core.method.federated`)
so that a ClientApp that hands its work to a site's resident worker
(:mod:`fedprime_core.site_worker`) can name itself without importing the method's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def client_identity(node_config: Mapping[str, Any], node_id: int) -> str:
    """The stable id under which the server keeps a client's state (its personal prompt pool, clients.json).

    The node config's ``client-id`` when given (a site's chosen name), else its
    ``partition-id`` (simulation and partitioned deployments), else ``node-<node id>``
    (stable for as long as the SuperNode runs).
    """
    explicit = node_config.get("client-id")
    if explicit not in (None, ""):
        return str(explicit)
    if "partition-id" in node_config:
        return str(int(node_config["partition-id"]))
    return f"node-{node_id}"
