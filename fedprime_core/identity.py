"""A client's identity from its node config: light enough for a ClientApp that imports no torch.

The client-id rules (:func:`client_id_problem`) and :func:`client_identity` live here (re-exported
by :mod:`fedprime_core.method.federated`) so that a ClientApp that hands its work to a site's resident worker
(:mod:`fedprime_core.site_worker`) can name itself without importing the method's modules.
"""

from __future__ import annotations

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
