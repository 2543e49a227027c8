"""The message protocol between the FedPrime ServerApp and ClientApps.

Server -> client (query): ``"config"`` ConfigRecord ``{"query": "identity"}``; the
client answers with the identity fields of its client-info record, a ``"client"``
ConfigRecord (``client-id``; ``partition-id`` and ``num-partitions`` when it has them:
``fedprime_core.runtime.ClientNode.describe``). The server asks every node before round
1, and a node it has not met before it first sends it a personal pool.

Server -> client (train and evaluate): ``RecordDict``
    ``"arrays"``  ArrayRecord: the global trainable state (prompt pools, keys, query maps,
                  pooler unless ``exchange-pooler=false``, head), where a personalised inter
                  pool is the client's own ``tau`` prompts and keys; never the backbone.
    ``"wire"``    ConfigRecord: ``dtype`` (``float32``, ``float16`` or ``bfloat16``: how the
                  arrays are encoded, :mod:`fedprime_core.wire`) and ``delta`` (always false
                  from the server). A record without it is float32.
    ``"config"``  ConfigRecord: ``server-round``.

Client -> server (train reply):
    ``"arrays"``  ArrayRecord: the locally trained state, same names and shapes; with
                  ``upload-delta`` the change to what the client received.
    ``"wire"``    ConfigRecord: ``dtype`` and ``delta`` of those arrays.
    ``"metrics"`` MetricRecord: ``num-examples``, ``train-loss``, ``train-regulariser``,
                  ``train-seconds``, ``steps``.
    ``"usage"``   ConfigRecord: pool name -> list of per-prompt selection counts.
    ``"pattern-usage"`` ConfigRecord: pool name -> the same counts split by the missing
                  pattern of the selecting sample, flattened ``(3, pool size)`` row-major.
    ``"client"``  ConfigRecord, the client-info record (``fedprime_core.runtime.client_info``:
                  ``ClientShard.describe`` and the fingerprints): ``client-id`` (and
                  ``partition-id`` when it has one),
                  ``data`` (``site`` or ``partition``), realised pattern counts
                  (``complete``, ``text-missing``, ``image-missing``, their ``real-*`` and
                  ``simulated-*`` parts, a site's ``skipped-no-modality`` rows),
                  ``num-train``, ``num-val``, ``mixture``, the ``backbone-fingerprint``
                  and the ``labels-fingerprint`` (of its class list).

Client -> server (evaluate reply): ``"metrics"`` with ``num-examples``, ``loss``,
``accuracy``, ``macro_f1``, ``micro_f1``.

No message ever carries a data sample or a backbone tensor.

Every array is cast for the wire here (both directions) and back to float32 on arrival
(:func:`encode_arrays`, :func:`read_arrays`); a bfloat16 array travels as the ``uint16``
upper half of its float32 pattern, since Flower's ``Array`` carries NumPy arrays and NumPy
has no bfloat16. What arrives is validated after the cast
(:func:`fedprime_core.method.federated.validate_update`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedprime_core.method.federated import ClientUpdate
from fedprime_core.wire import WIRE_DTYPES, apply_delta, decode_state, encode_array, encode_state, state_delta

ARRAYS, CONFIG, METRICS, USAGE, CLIENT, WIRE = "arrays", "config", "metrics", "usage", "client", "wire"
PATTERN_USAGE = "pattern-usage"
#: The metric that weighs a reply (FedAvg's ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
IDENTITY_QUERY = "identity"


def state_to_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """Named arrays in an ArrayRecord, encoded in ``wire_dtype`` (names preserved).

    Raises:
        fedprime_core.wire.WireRangeError: a finite value does not fit ``wire_dtype``.
    """
    encoded = encode_state(state, wire_dtype)
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in encoded.items()})


def record_to_state(record: ArrayRecord, wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Named float32 arrays of an ArrayRecord encoded in ``wire_dtype``."""
    return decode_state({name: array.numpy() for name, array in record.items()}, wire_dtype)


def wire_record(wire_dtype: str, delta: bool = False) -> ConfigRecord:
    """The tag saying how a message's ``"arrays"`` are encoded."""
    return ConfigRecord({"dtype": wire_dtype, "delta": bool(delta)})


def encode_arrays(
    state: Mapping[str, np.ndarray], wire_dtype: str = "float32", reference: Mapping[str, np.ndarray] | None = None
) -> dict[str, ArrayRecord | ConfigRecord]:
    """``{"arrays": ..., "wire": ...}`` for a message: ``state`` (or ``state - reference``) in ``wire_dtype``."""
    arrays = state if reference is None else state_delta(state, reference)
    return {ARRAYS: state_to_record(arrays, wire_dtype), WIRE: wire_record(wire_dtype, reference is not None)}


def read_wire(content: RecordDict) -> tuple[str, bool]:
    """``(dtype, delta)`` of a message's arrays, from its ``"wire"`` record (float32, no delta without one).

    Raises:
        ValueError: an unknown dtype or a non-boolean delta flag.
    """
    record = content.config_records.get(WIRE)
    if record is None:
        return "float32", False
    dtype, delta = record.get("dtype", "float32"), record.get("delta", False)
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if not isinstance(delta, bool):
        raise ValueError(f"wire delta flag {delta!r} is not a boolean")
    return str(dtype), delta


def instruction_content(
    state: Mapping[str, np.ndarray], config: ConfigRecord, wire_dtype: str = "float32"
) -> RecordDict:
    """What the server sends a node to train or evaluate: ``state`` in ``wire_dtype`` and ``config``.

    Raises:
        fedprime_core.wire.WireRangeError: a finite value does not fit ``wire_dtype``.
    """
    return RecordDict({**encode_arrays(state, wire_dtype), CONFIG: config})


def instruction_contents(
    states: Mapping[Any, Mapping[str, np.ndarray]], config: ConfigRecord, wire_dtype: str = "float32"
) -> dict[Any, RecordDict]:
    """:func:`instruction_content` for many nodes at once: node -> what it is sent.

    An array object that several states share (the global arrays beside each client's own
    inter pool) is encoded once and its encoded bytes are shared by every record that holds
    it, so a round's messages hold the global state once plus each client's own arrays,
    instead of the whole state once per client (what the server keeps until the round's
    replies are in: at 1,000 clients, 1,000 copies of the global state otherwise;
    benchmarks/server_memory.py). What each node receives is unchanged.

    Raises:
        fedprime_core.wire.WireRangeError: a finite value does not fit ``wire_dtype``.
    """
    encoded: dict[int, tuple[np.ndarray, Array]] = {}  # id -> (the array, kept alive so ids stay unique; its encoding)

    def record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
        arrays = {}
        for name, value in state.items():
            seen = encoded.get(id(value))
            if seen is None:
                seen = encoded[id(value)] = (value, Array(np.ascontiguousarray(encode_array(name, value, wire_dtype))))
            arrays[name] = seen[1]
        return ArrayRecord(arrays)

    wire = wire_record(wire_dtype)
    return {node: RecordDict({ARRAYS: record(state), WIRE: wire, CONFIG: config}) for node, state in states.items()}


def read_server_round(content: RecordDict) -> int:
    """The ``server-round`` of a server's message (0 when it names none)."""
    config = content.config_records.get(CONFIG)
    return int(config.get("server-round", 0)) if config is not None else 0


def read_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """The float32 arrays of a message from the server (decoded as its ``"wire"`` record says).

    Raises:
        ValueError: the arrays do not match their tag, or claim to be a delta (the server
            always sends whole arrays).
    """
    dtype, delta = read_wire(content)
    if delta:
        raise ValueError("the server's arrays are tagged as a delta; it always sends whole arrays")
    return record_to_state(content.array_records[ARRAYS], dtype)


def train_reply_content(
    state: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    usage: Mapping[str, np.ndarray],
    client: Mapping[str, Any],
    pattern_usage: Mapping[str, np.ndarray] | None = None,
    *,
    wire_dtype: str = "float32",
    reference: Mapping[str, np.ndarray] | None = None,
) -> RecordDict:
    """The RecordDict a client returns after training.

    Args:
        state: the trained arrays (float32).
        metrics, usage, client, pattern_usage: see the module docstring.
        wire_dtype: encoding of the arrays.
        reference: the arrays the client received; given, the reply carries
            ``state - reference`` (``upload-delta``).

    Raises:
        fedprime_core.wire.WireRangeError: a finite value does not fit ``wire_dtype``.
    """
    content = {
        **encode_arrays(state, wire_dtype, reference),
        METRICS: MetricRecord(dict(metrics)),
        USAGE: ConfigRecord({pool: [int(c) for c in counts] for pool, counts in usage.items()}),
        CLIENT: ConfigRecord(dict(client)),
    }
    if pattern_usage:
        content[PATTERN_USAGE] = ConfigRecord(
            {pool: [int(c) for c in np.asarray(table).ravel()] for pool, table in pattern_usage.items()}
        )
    return RecordDict(content)


def evaluate_reply_content(metrics: Mapping[str, float | int]) -> RecordDict:
    """The RecordDict a client returns after evaluating: its metrics, ``num-examples`` as an integer."""
    values: dict[str, float | int] = {k: float(v) for k, v in metrics.items() if k != NUM_EXAMPLES}
    values[NUM_EXAMPLES] = int(metrics[NUM_EXAMPLES])
    return RecordDict({METRICS: MetricRecord(values)})


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


def parse_train_reply(
    message: Message, sent: Mapping[str, np.ndarray] | None = None
) -> tuple[ClientUpdate | None, dict[str, Any], list[str]]:
    """Turn a train reply into a :class:`ClientUpdate` without trusting its contents.

    The arrays are decoded to float32 as the reply's ``"wire"`` record says; a delta is
    added to ``sent``, the float32 arrays the server sent that node.

    Returns:
        ``(update, client_info, reasons)``; ``update`` is ``None`` and ``reasons`` says why
        when the reply is structurally unusable (missing records, unreadable arrays, arrays
        that do not match their wire tag, a delta without ``sent``).
        Content checks (shapes, NaN, norms, usage sizes) are left to
        :func:`fedprime_core.method.federated.validate_update`.
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
        dtype, delta = read_wire(content)
        state = record_to_state(content.array_records[ARRAYS], dtype)
    except Exception as exc:  # noqa: BLE001 - a corrupt array must not stop the round
        return None, {}, [f"arrays cannot be decoded: {type(exc).__name__}: {exc}"]
    if delta:
        if sent is None:
            return None, {}, ["reply carries a delta, but the server sent this node nothing to add it to"]
        state = apply_delta(sent, state)
    metrics = content.metric_records[METRICS]
    usage_record = content.config_records.get(USAGE, ConfigRecord())
    usage = {pool: np.asarray(counts) for pool, counts in usage_record.items()}
    pattern_usage = {
        pool: _pattern_table(flat, len(usage.get(pool, ())))
        for pool, flat in content.config_records.get(PATTERN_USAGE, ConfigRecord()).items()
    }
    info = dict(content.config_records.get(CLIENT, ConfigRecord()))
    num_examples = metrics.get(NUM_EXAMPLES, 0)
    if isinstance(num_examples, float) and num_examples.is_integer():
        num_examples = int(num_examples)
    update = ClientUpdate(
        state=state,
        num_examples=num_examples,
        usage=usage,
        client_id=str(info.get("client-id", info.get("partition-id", message.metadata.src_node_id))),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        pattern_usage=pattern_usage,
        wire=dtype + (" delta" if delta else ""),
    )
    return update, info, []


def _pattern_table(flat: Any, pool_size: int) -> np.ndarray:
    """A flattened ``(3, pool size)`` table back in shape (left as sent when it cannot be; the validator says why)."""
    values = np.asarray(flat)
    if values.ndim == 1 and pool_size > 0 and values.size == 3 * pool_size:
        return values.reshape(3, pool_size)
    return values
