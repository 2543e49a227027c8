"""The message protocol between the FedPrime ServerApp and ClientApps.

Server -> client (query): ``"config"`` ConfigRecord ``{"query": "identity"}``; the
client answers with its ``"client"`` ConfigRecord (``client-id``, ``partition-id`` when
it has one). The server asks each node once, before it first sends it a personal pool.

Server -> client (train and evaluate): ``RecordDict``
    ``"arrays"``  ArrayRecord: the global trainable state (prompt pools, keys, query maps,
                  pooler, head), where a personalised inter pool is the client's own
                  ``tau`` prompts and keys; never the backbone.
    ``"config"``  ConfigRecord: ``server-round``.

Client -> server (train reply):
    ``"arrays"``  ArrayRecord: the locally trained state, same names and shapes.
    ``"metrics"`` MetricRecord: ``num-examples``, ``train-loss``, ``train-regulariser``,
                  ``train-seconds``, ``steps``.
    ``"usage"``   ConfigRecord: pool name -> list of per-prompt selection counts.
    ``"pattern-usage"`` ConfigRecord: pool name -> the same counts split by the missing
                  pattern of the selecting sample, flattened ``(3, pool size)`` row-major.
    ``"client"``  ConfigRecord: ``client-id`` (and ``partition-id`` when it has one),
                  ``data`` (``site`` or ``partition``), realised pattern counts
                  (``complete``, ``text-missing``, ``image-missing``, their ``real-*`` and
                  ``simulated-*`` parts, a site's ``skipped-no-modality`` rows),
                  ``num-train``, ``num-val``, ``mixture``, the ``backbone-fingerprint``
                  and the ``labels-fingerprint`` (of its class list).

Client -> server (evaluate reply): ``"metrics"`` with ``num-examples``, ``loss``,
``accuracy``, ``macro_f1``, ``micro_f1``.

No message ever carries a data sample or a backbone tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedprime_core.federated import ClientUpdate

ARRAYS, CONFIG, METRICS, USAGE, CLIENT = "arrays", "config", "metrics", "usage", "client"
PATTERN_USAGE = "pattern-usage"
IDENTITY_QUERY = "identity"


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap named NumPy arrays in an ArrayRecord (names preserved)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named NumPy arrays of an ArrayRecord."""
    return {name: array.numpy() for name, array in record.items()}


def train_reply_content(
    state: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    usage: Mapping[str, np.ndarray],
    client: Mapping[str, Any],
    pattern_usage: Mapping[str, np.ndarray] | None = None,
) -> RecordDict:
    """The RecordDict a client returns after training."""
    content = {
        ARRAYS: state_to_record(state),
        METRICS: MetricRecord(dict(metrics)),
        USAGE: ConfigRecord({pool: [int(c) for c in counts] for pool, counts in usage.items()}),
        CLIENT: ConfigRecord(dict(client)),
    }
    if pattern_usage:
        content[PATTERN_USAGE] = ConfigRecord(
            {pool: [int(c) for c in np.asarray(table).ravel()] for pool, table in pattern_usage.items()}
        )
    return RecordDict(content)


def identity_query() -> RecordDict:
    """What the server sends to learn a node's client id."""
    return RecordDict({CONFIG: ConfigRecord({"query": IDENTITY_QUERY})})


def identity_reply_content(client: Mapping[str, Any]) -> RecordDict:
    """A client's answer to :func:`identity_query`: its client-info record."""
    return RecordDict({CLIENT: ConfigRecord(dict(client))})


def parse_identity_reply(message: Message) -> tuple[str | None, str]:
    """``(client id, "")`` from an identity reply, or ``(None, reason)`` when it has none."""
    if message.has_error():
        return None, f"client error: {message.error.reason}"
    record = message.content.config_records.get(CLIENT)
    client = record.get("client-id") if record is not None else None
    if not isinstance(client, str) or not client:
        return None, "identity reply has no 'client-id'"
    return client, ""


def parse_train_reply(message: Message) -> tuple[ClientUpdate | None, dict[str, Any], list[str]]:
    """Turn a train reply into a :class:`ClientUpdate` without trusting its contents.

    Returns:
        ``(update, client_info, reasons)``; ``update`` is ``None`` and ``reasons`` says why
        when the reply is structurally unusable (missing records, unreadable arrays).
        Content checks (shapes, NaN, norms, usage sizes) are left to
        :func:`fedprime_core.federated.validate_update`.
    """
    content = message.content
    reasons: list[str] = []
    if ARRAYS not in content.array_records:
        reasons.append(f"reply has no '{ARRAYS}' ArrayRecord")
    if METRICS not in content.metric_records:
        reasons.append(f"reply has no '{METRICS}' MetricRecord")
    if reasons:
        return None, {}, reasons
    try:
        state = record_to_state(content.array_records[ARRAYS])
    except Exception as exc:  # noqa: BLE001 - a corrupt array must not stop the round
        return None, {}, [f"arrays cannot be decoded: {type(exc).__name__}: {exc}"]
    metrics = content.metric_records[METRICS]
    usage_record = content.config_records.get(USAGE, ConfigRecord())
    usage = {pool: np.asarray(counts) for pool, counts in usage_record.items()}
    pattern_usage = {
        pool: _pattern_table(flat, len(usage.get(pool, ())))
        for pool, flat in content.config_records.get(PATTERN_USAGE, ConfigRecord()).items()
    }
    info = dict(content.config_records.get(CLIENT, ConfigRecord()))
    num_examples = metrics.get("num-examples", 0)
    if isinstance(num_examples, float) and num_examples.is_integer():
        num_examples = int(num_examples)
    update = ClientUpdate(
        state=state,
        num_examples=num_examples,
        usage=usage,
        client_id=str(info.get("client-id", info.get("partition-id", message.metadata.src_node_id))),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        pattern_usage=pattern_usage,
    )
    return update, info, []


def _pattern_table(flat: Any, pool_size: int) -> np.ndarray:
    """A flattened ``(3, pool size)`` table back in shape (left as sent when it cannot be; the validator says why)."""
    values = np.asarray(flat)
    if values.ndim == 1 and pool_size > 0 and values.size == 3 * pool_size:
        return values.reshape(3, pool_size)
    return values
