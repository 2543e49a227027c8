"""The message protocol between the FedPrime ServerApp and ClientApps.

Server -> client (train and evaluate): ``RecordDict``
    ``"arrays"``  ArrayRecord: the global trainable state (prompt pools, keys, query maps,
                  pooler, head); never the backbone.
    ``"config"``  ConfigRecord: ``server-round``.

Client -> server (train reply):
    ``"arrays"``  ArrayRecord: the locally trained state, same names and shapes.
    ``"metrics"`` MetricRecord: ``num-examples``, ``train-loss``, ``train-regulariser``,
                  ``train-seconds``, ``steps``.
    ``"usage"``   ConfigRecord: pool name -> list of per-prompt selection counts.
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
) -> RecordDict:
    """The RecordDict a client returns after training."""
    return RecordDict(
        {
            ARRAYS: state_to_record(state),
            METRICS: MetricRecord(dict(metrics)),
            USAGE: ConfigRecord({pool: [int(c) for c in counts] for pool, counts in usage.items()}),
            CLIENT: ConfigRecord(dict(client)),
        }
    )


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
    )
    return update, info, []
