"""The message protocol between the FedPrime ServerApp and ClientApps.

Server -> client (query): ``"config"`` ConfigRecord ``{"query": "identity"}``; the
client answers with the identity fields of its client-info record, a ``"client"``
ConfigRecord (``client-id``; ``partition-id`` and ``num-partitions`` when it has them:
``fedprime_core.identity.ClientNode.describe``). The server asks every node before round
1, and a node it has not met before it first sends it a personal pool.

Server -> client (train and evaluate): ``RecordDict``
    ``"arrays"``  ArrayRecord: the global trainable state (prompt pools, keys, query maps,
                  pooler unless ``exchange-pooler=false``, head), where a personalised inter
                  pool is the client's own ``tau`` prompts and keys; never the backbone.
    ``"wire"``    ConfigRecord: ``dtype`` (``float32``, ``float16`` or ``bfloat16``: how the
                  arrays are encoded, :mod:`fedprime_core.wire`) and ``delta`` (always false
                  from the server). A record without it is float32.
    ``"config"``  ConfigRecord: ``server-round``; in a train message, ``evaluate-first`` (the
                  round whose state the arrays are) asks the client to evaluate the arrays as
                  received, before it trains on them (:func:`read_evaluate_first`): the client-side
                  evaluation of round ``r`` travels with round ``r+1``'s training, one message
                  cycle instead of two.

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
    ``"evaluation"`` MetricRecord, only when the train message said ``evaluate-first``: what
                  an evaluate reply's ``"metrics"`` holds, for the arrays as received; where
                  that evaluation failed, ``"evaluation-error"`` ConfigRecord ``{"reason": ...}``
                  instead (the training is unaffected).

Client -> server (evaluate reply): ``"metrics"`` with ``num-examples``, ``loss``,
``accuracy``, ``macro_f1``, ``micro_f1`` of the client's validation split and the same,
prefixed ``test-``, of its own test set (``fedprime_core.runtime.client_evaluate``; absent
when it has none), and ``eval-seconds`` (the local evaluation's time); ``"client"``
ConfigRecord with the identity fields (``client-id``, ...).

Server -> client (query): also answered by a site with its data check, the ``"site-check"``
ConfigRecord (:func:`identity_reply_content`; the server decides in ``server_app/sites.py``).

No message ever carries a data sample or a backbone tensor.

Every array is cast for the wire here (both directions) and back to float32 on arrival
(:func:`encode_arrays`, :func:`read_arrays`); a bfloat16 array travels as the ``uint16``
upper half of its float32 pattern, since Flower's ``Array`` carries NumPy arrays and NumPy
has no bfloat16. What arrives is validated after the cast
(:func:`fedprime_core.method.federated.validate_update`). Every other value in a reply
(client record, metrics, counts) is parsed into typed, bounded values at one boundary,
:mod:`fedprime_protocol.replies`, by :func:`parse_identity_record`, :func:`parse_train_reply`
and :func:`parse_evaluate_reply`; what does not fit its schema is a rejection with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedprime_core.wire import WIRE_DTYPES, apply_delta, decode_state, encode_array, encode_state, state_delta

from .replies import (
    IDENTITY_REQUIRED,
    ReplyLimits,
    clean_line,
    parse_client_record,
    parse_counts,
    parse_evaluate_metrics,
    parse_site_check_record,
    parse_train_metrics,
    show,
)

if TYPE_CHECKING:  # the method's modules import torch; a ClientApp served by a site worker never needs them
    from fedprime_core.method.federated import ClientUpdate

ARRAYS, CONFIG, METRICS, USAGE, CLIENT, WIRE = "arrays", "config", "metrics", "usage", "client", "wire"
#: The MetricRecord of a train reply that carries the client-side evaluation of the arrays as received.
EVALUATION = "evaluation"
#: The train message's config key asking for that evaluation; its value is the round whose state was sent.
EVALUATE_FIRST = "evaluate-first"
#: The ConfigRecord of a train reply whose evaluation failed (``reason``: one line); the training still counts.
EVALUATION_ERROR = "evaluation-error"
#: The ConfigRecord of an identity reply that says whether a site's data can be trained on.
SITE_CHECK = "site-check"
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
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {show(dtype)} is not one of {', '.join(WIRE_DTYPES)}")
    if not isinstance(delta, bool):
        raise ValueError(f"wire delta flag {show(delta)} is not a boolean")
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


def read_evaluate_first(content: RecordDict) -> int | None:
    """The round whose state a train message carries when it asks to evaluate that state first, else ``None``."""
    config = content.config_records.get(CONFIG)
    value = config.get(EVALUATE_FIRST) if config is not None else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


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
    evaluation: Mapping[str, float | int] | None = None,
    evaluation_error: str | None = None,
) -> RecordDict:
    """The RecordDict a client returns after training.

    Args:
        state: the trained arrays (float32).
        metrics: the train metrics (see the module docstring).
        usage: pool name -> prompt selection counts.
        client: the client-info record.
        pattern_usage: pool name -> the counts split by missing pattern.
        wire_dtype: encoding of the arrays.
        reference: the arrays the client received; given, the reply carries
            ``state - reference`` (``upload-delta``).
        evaluation: the metrics of the arrays as received, when the message said
            ``evaluate-first`` (the ``"evaluation"`` record, as :func:`evaluate_reply_content` writes it).
        evaluation_error: why that evaluation failed (the ``"evaluation-error"`` record).

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
    if evaluation is not None:
        content[EVALUATION] = _metric_record(evaluation)
    if evaluation_error is not None:
        content[EVALUATION_ERROR] = ConfigRecord({"reason": evaluation_error})
    return RecordDict(content)


def _metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """Evaluation metrics as they travel: sample counts as integers, the rest as floats."""
    values: dict[str, float | int] = {k: int(v) if k.endswith(NUM_EXAMPLES) else float(v) for k, v in metrics.items()}
    values[NUM_EXAMPLES] = int(metrics[NUM_EXAMPLES])
    return MetricRecord(values)


def evaluate_reply_content(metrics: Mapping[str, float | int], client: Mapping[str, Any] | None = None) -> RecordDict:
    """The RecordDict a client returns after evaluating: its metrics (sample counts as integers) and,
    given, its identity fields (``client``)."""
    content: dict[str, Any] = {METRICS: _metric_record(metrics)}
    if client:
        content[CLIENT] = ConfigRecord(dict(client))
    return RecordDict(content)


def identity_query() -> RecordDict:
    """What the server sends to learn a node's client id."""
    return RecordDict({CONFIG: ConfigRecord({"query": IDENTITY_QUERY})})


def identity_reply_content(client: Mapping[str, Any], site_check: Mapping[str, Any] | None = None) -> RecordDict:
    """A client's answer to :func:`identity_query`: its client-info record, and a site's data check.

    ``site_check`` (a site-local node only: :func:`fedprime_core.runtime.site_check`) becomes the
    ``"site-check"`` ConfigRecord: ``ok``, ``problems`` (one line each), ``warnings``, and for a
    usable site its counts (``num-train``, ``num-val``, pattern counts, ``mixture``,
    ``num-classes-present``), its ``summary`` line and fingerprints.
    """
    content: dict[str, ConfigRecord] = {CLIENT: ConfigRecord(dict(client))}
    if site_check is not None:
        content[SITE_CHECK] = ConfigRecord(dict(site_check))
    return RecordDict(content)


def parse_identity_record(message: Message) -> tuple[dict[str, Any] | None, str]:
    """``(typed client record, "")`` of an identity reply, or ``(None, reason)`` when it is unusable.

    The record is parsed by :func:`fedprime_protocol.replies.parse_client_record` (every field
    typed and bounded, ``client-id`` required, no unknown field).
    """
    if message.has_error():
        return None, f"client error: {message.error.reason}"
    record = message.content.config_records.get(CLIENT)
    if record is None:
        return None, f"identity reply has no '{CLIENT}' record"
    client, reasons = parse_client_record(dict(record), required=IDENTITY_REQUIRED)
    if reasons:
        return None, "; ".join(reasons)
    return client, ""


def parse_site_check(message: Message) -> tuple[dict[str, Any] | None, str]:
    """``(typed data check, "")`` of a site's identity reply, ``(None, "")`` when it carries none
    (a partitioned node), or ``(None, reason)`` when the record does not fit
    :data:`fedprime_protocol.replies.SITE_CHECK_FIELDS`."""
    if message.has_error() or SITE_CHECK not in message.content.config_records:
        return None, ""
    check, reasons = parse_site_check_record(dict(message.content.config_records[SITE_CHECK]))
    return (None, "; ".join(reasons)) if reasons else (check, "")


def parse_identity_reply(message: Message) -> tuple[str | None, str]:
    """``(client id, "")`` from an identity reply, or ``(None, reason)`` (:func:`parse_identity_record`)."""
    client, reason = parse_identity_record(message)
    return (client["client-id"], "") if client is not None else (None, reason)


def parse_train_reply(
    message: Message,
    sent: Mapping[str, np.ndarray] | None = None,
    *,
    pools: Sequence[str] | None = None,
    limits: ReplyLimits = ReplyLimits(),
) -> tuple[ClientUpdate | None, dict[str, Any], list[str]]:
    """Turn a train reply into a :class:`ClientUpdate` without trusting its contents.

    The arrays are decoded to float32 as the reply's ``"wire"`` record says; a delta is
    added to ``sent``, the float32 arrays the server sent that node. Every other record is
    parsed at :mod:`fedprime_protocol.replies`: the client record, the metrics (with
    ``num-examples`` bounded by ``limits`` and the client's own ``num-train``), the usage
    and pattern-usage counts of ``pools`` (default: whatever pools the reply names).

    Returns:
        ``(update, client_info, reasons)``; ``update`` is ``None`` and ``reasons`` says why
        when anything cannot be used (missing records, unreadable arrays, arrays that do
        not match their wire tag, a delta without ``sent``, a field of the wrong type or out
        of bounds). ``client_info`` is the typed client record (empty when it was refused).
        Content checks of the arrays and of the counts against the pools (shapes, NaN,
        norms, usage sizes) are left to :func:`fedprime_core.method.federated.validate_update`.
    """
    from fedprime_core.method.federated import ClientUpdate

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
        return None, {}, [f"arrays cannot be decoded: {type(exc).__name__}: {clean_line(str(exc), 300)}"]
    if delta:
        if sent is None:
            return None, {}, ["reply carries a delta, but the server sent this node nothing to add it to"]
        try:
            state = apply_delta(sent, state)
        except Exception as exc:  # noqa: BLE001 - a delta of another shape is the client's fault
            return None, {}, [f"the delta cannot be added to what was sent: {type(exc).__name__}"]
    record = content.config_records.get(CLIENT)
    info, reasons = parse_client_record(dict(record) if record is not None else {}, required=())
    if reasons:
        info = {}
    metrics, metric_reasons = parse_train_metrics(dict(content.metric_records[METRICS]), limits, info)
    usage_record, pattern_record = content.config_records.get(USAGE), content.config_records.get(PATTERN_USAGE)
    usage, pattern_usage, count_reasons = parse_counts(
        dict(usage_record) if usage_record is not None else None,
        dict(pattern_record) if pattern_record is not None else None,
        tuple(pools) if pools is not None else tuple(usage_record or ()),
    )
    reasons += metric_reasons + count_reasons
    if reasons:
        return None, info, reasons
    if "client-id" in info:
        client_id = info["client-id"]
    elif "partition-id" in info:
        client_id = str(info["partition-id"])
    else:
        client_id = f"node-{int(message.metadata.src_node_id)}"
    update = ClientUpdate(
        state=state,
        num_examples=int(metrics[NUM_EXAMPLES]),
        usage=usage,
        client_id=client_id,
        metrics={k: v for k, v in metrics.items() if k != NUM_EXAMPLES},
        pattern_usage=pattern_usage,
        wire=dtype + (" delta" if delta else ""),
    )
    return update, info, []


def parse_evaluate_reply(
    message: Message, limits: ReplyLimits = ReplyLimits(), *, record_name: str = METRICS
) -> tuple[dict[str, Any] | None, str]:
    """``(typed metrics, "")`` of an evaluate reply (:data:`fedprime_protocol.replies.EVALUATE_METRICS`),
    ``(None, "")`` for a client that evaluated no sample (neither validation nor its own test set), or
    ``(None, reason)`` when it is refused.

    ``record_name``: the MetricRecord that holds the evaluation (:data:`EVALUATION` for the
    evaluation a train reply carries).
    """
    if message.has_error():
        return None, f"client error: {message.error.reason}"
    record = message.content.metric_records.get(record_name)
    if record is None:
        failed = message.content.config_records.get(EVALUATION_ERROR) if record_name == EVALUATION else None
        if failed is not None:
            return None, f"the client's evaluation failed: {clean_line(failed.get('reason', ''), 300)}"
        return None, f"reply has no '{record_name}' MetricRecord"
    metrics, reasons = parse_evaluate_metrics(dict(record), limits)
    if reasons:
        return None, "; ".join(reasons)
    if metrics[NUM_EXAMPLES] == 0 and not metrics.get("test-" + NUM_EXAMPLES):
        return None, ""
    return metrics, ""
