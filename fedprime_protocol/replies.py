"""The one parsing boundary for what a client sends: typed, bounded values, or a rejection with a reason.

A reply's records are the client's word: a broken or hostile client can put any value
Flower can carry (integers, floats, strings, bytes, booleans, lists of them; in process
any Python object) under any key. Nothing from a reply reaches JSON writing, sorting,
logging or arithmetic without passing through a schema here:

* :data:`CLIENT_FIELDS`: the client-info record (identity reply and train reply): one
  parser per field name (type, range, string length, characters). A field this server
  does not know is a rejection: add a line to extend the record (e.g. a site's data check).
* :data:`TRAIN_METRICS`, :data:`EVALUATE_METRICS`: the metric records.
* :func:`parse_counts`: usage and pattern-usage counts (non-negative integers, bounded lengths).
* :func:`parse_client_log`: the log lines a client returns (bounded, control characters
  removed, levels clamped).

Every parser returns ``(value, reasons)``; an empty ``reasons`` means the value is typed and
within bounds. Reasons are one line each and quote at most a few dozen characters of what
was sent. Arrays are parsed by :mod:`fedprime_core.wire` and checked by
:func:`fedprime_core.method.federated.validate_update`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import CRITICAL, DEBUG, INFO
from typing import Any

import numpy as np

from fedprime_core.data.records import PATTERN_NAMES
from fedprime_core.identity import client_id_problem

#: Rows of a pattern-usage table: one per missing pattern.
NUM_PATTERNS = len(PATTERN_NAMES)

#: A parser: the typed value, or raises :class:`Rejected`.
Parser = Callable[[Any], Any]

#: Bounds of what any client may claim, whatever the run.
MAX_COUNT = 10**12  # one usage count, a sample count before the run's own cap
MAX_PARTITIONS = 1_000_000
MAX_ENTRIES = 100_000  # entries of one usage vector (a pool's size)
MAX_FIELDS = 64  # fields of one record
MAX_TEXT_CHARS = 128  # a short string field (a fingerprint)
MAX_LOSS = 1e9  # a loss or regulariser; beyond it a client has diverged
MAX_SECONDS = 1e7
#: Log lines a client may return with one reply, and characters per line (fedprime_protocol.logs).
MAX_LOG_LINES = 200
MAX_LOG_CHARS = 2000

_TOKEN = re.compile(r"[A-Za-z0-9._:+-]*")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 40, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxdict = 4


class Rejected(ValueError):
    """A value a client sent that the schema does not allow; the message says why, in one line."""


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control and format characters:
    line breaks, ANSI escapes, bidirectional overrides) shown as ``?``."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def show(value: Any, limit: int = 40) -> str:
    """A short, printable rendering of something a client sent (for a reason or a log line)."""
    try:
        text = _SHORT.repr(value)
        if not isinstance(value, (str, bytes)):
            text = f"{type(value).__name__} {text}"
    except Exception:  # noqa: BLE001 - a hostile object's repr may raise (or be an int of 5,000 digits)
        text = f"a {type(value).__name__}"
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- field parsers ------------------------------------------------------------------------
def integer(low: int, high: int) -> Parser:
    """An integer in ``[low, high]`` (an integral float is accepted; a boolean is not)."""

    def parse(value: Any) -> int:
        if isinstance(value, (bool, np.bool_)):
            raise Rejected(f"must be an integer, got {show(value)}")
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        if not isinstance(value, (int, np.integer)):
            raise Rejected(f"must be an integer, got {show(value)}")
        if not low <= value <= high:
            raise Rejected(f"must lie in {low}..{high}, got {show(int(value))}")
        return int(value)

    return parse


def number(low: float, high: float) -> Parser:
    """A finite number in ``[low, high]``, as a float."""

    def parse(value: Any) -> float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise Rejected(f"must be a number, got {show(value)}")
        try:
            out = float(value)
        except OverflowError:  # an int beyond float's range
            raise Rejected(f"must lie in {low:g}..{high:g}, got a {int(value).bit_length()}-bit integer") from None
        if not math.isfinite(out) or not low <= out <= high:
            raise Rejected(f"must be a finite number in {low:g}..{high:g}, got {show(value)}")
        return out

    return parse


def choice(*allowed: str) -> Parser:
    """One of the strings ``allowed``."""

    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise Rejected(f"must be one of {', '.join(allowed)}, got {show(value)}")
        return value

    return parse


def token(max_chars: int = MAX_TEXT_CHARS) -> Parser:
    """A short string of ASCII letters, digits and ``._:+-`` (a fingerprint, a version)."""

    def parse(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_chars or _TOKEN.fullmatch(value) is None:
            raise Rejected(f"must be up to {max_chars} ASCII letters, digits and '._:+-', got {show(value)}")
        return value

    return parse


def fractions(length: int) -> Parser:
    """A list of ``length`` numbers in ``[0, 1]``."""
    each = number(0.0, 1.0)

    def parse(value: Any) -> list[float]:
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise Rejected(f"must be a list of {length} numbers in 0..1, got {show(value)}")
        return [each(v) for v in value]

    return parse


def client_id(value: Any) -> str:
    """A client id (:func:`fedprime_core.method.federated.client_id_problem`)."""
    problem = client_id_problem(value)
    if problem:
        raise Rejected(problem)
    return str(value)


COUNT = integer(0, MAX_COUNT)

#: The client-info record, field by field (``fedprime_core.runtime.client_info``,
#: ``ClientNode.describe``). A field not named here is a rejection: add it here first.
CLIENT_FIELDS: dict[str, Parser] = {
    "client-id": client_id,
    "partition-id": integer(0, MAX_PARTITIONS - 1),
    "num-partitions": integer(1, MAX_PARTITIONS),
    "data": choice("site", "partition"),
    "num-train": COUNT,
    "num-val": COUNT,
    "num-test": COUNT,
    "mixture": fractions(NUM_PATTERNS),
    "simulated-mixture": fractions(NUM_PATTERNS),
    "complete": COUNT,
    "text-missing": COUNT,
    "image-missing": COUNT,
    "real-text-missing": COUNT,
    "real-image-missing": COUNT,
    "simulated-text-missing": COUNT,
    "simulated-image-missing": COUNT,
    "skipped-no-modality": COUNT,
    "backbone-fingerprint": token(),
    "labels-fingerprint": token(),
}
#: Lines of a site's data check (problems, warnings) the server keeps.
MAX_CHECK_LINES = 100


def boolean(value: Any) -> bool:
    """A boolean (``True``/``False``; no number or string stands for one)."""
    if not isinstance(value, (bool, np.bool_)):
        raise Rejected(f"must be true or false, got {show(value)}")
    return bool(value)


def text_lines(max_lines: int = MAX_CHECK_LINES, max_chars: int = MAX_LOG_CHARS) -> Parser:
    """A list of at most ``max_lines`` strings, each cut to ``max_chars`` printable characters."""

    def parse(value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or len(value) > max_lines:
            raise Rejected(f"must be a list of at most {max_lines} strings, got {show(value)}")
        if not all(isinstance(v, str) for v in value):
            raise Rejected(f"must be a list of strings, got {show(value)}")
        return [clean_line(v, max_chars) for v in value]

    return parse


def text_line(max_chars: int = MAX_LOG_CHARS) -> Parser:
    """One string, cut to ``max_chars`` printable characters."""

    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise Rejected(f"must be a string, got {show(value)}")
        return clean_line(value, max_chars)

    return parse


#: A site's data check (``fedprime_core.runtime.site_check``), part of its identity reply: the
#: verdict, its reasons, and for a usable site its client-info fields, class counts and summary.
SITE_CHECK_FIELDS: dict[str, Parser] = {
    **{k: v for k, v in CLIENT_FIELDS.items() if k != "client-id"},
    "ok": boolean,
    "problems": text_lines(),
    "warnings": text_lines(),
    "num-classes": COUNT,
    "num-classes-present": COUNT,
    "summary": text_line(),
}


#: Fields an identity reply must carry; a train reply's record may leave out any but these.
IDENTITY_REQUIRED = ("client-id",)

#: Train metrics (``client_app.train``): the sample count's upper bound is the run's (see
#: :class:`ReplyLimits`); ``num-examples`` is required, the rest optional.
TRAIN_METRICS: dict[str, Parser] = {
    "num-examples": integer(1, MAX_COUNT),
    "train-loss": number(0.0, MAX_LOSS),
    "train-regulariser": number(-MAX_LOSS, MAX_LOSS),
    "train-seconds": number(0.0, MAX_SECONDS),
    "steps": integer(0, MAX_COUNT),
}
#: Evaluate metrics (``fedprime_core.method.training.evaluate``).
_EVALUATE_VALUES: dict[str, Parser] = {
    "num-examples": integer(0, MAX_COUNT),
    "loss": number(0.0, MAX_LOSS),
    "accuracy": number(0.0, 1.0),
    "macro_f1": number(0.0, 1.0),
    "micro_f1": number(0.0, 1.0),
}
#: The client's validation split, and its own test set under ``test-`` (``client-test-samples``).
EVALUATE_METRICS: dict[str, Parser] = {
    **_EVALUATE_VALUES,
    **{f"test-{name}": parser for name, parser in _EVALUATE_VALUES.items()},
    "eval-seconds": number(0.0, MAX_SECONDS),  # the local evaluation's time (not averaged)
}


@dataclasses.dataclass(frozen=True)
class ReplyLimits:
    """What the run allows a client to claim.

    Attributes:
        max_examples: the most samples one reply may claim (``max-client-examples``).
        known_train: the ``num-train`` the client reported before (its identity record, or
            its site's data check), when it did: a train reply may claim no more.
        known_val, known_test: likewise its ``num-val`` and ``num-test``: an evaluate reply
            may claim no more ``num-examples`` and ``test-num-examples``.
    """

    max_examples: int = 1_000_000
    known_train: int | None = None
    known_val: int | None = None
    known_test: int | None = None


def parse_record(
    values: Mapping[str, Any] | None, schema: Mapping[str, Parser], what: str, required: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """``(typed record, reasons)`` of a record under ``schema``; every field parsed, the unknown ones refused."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        return {}, [f"{what} must be a record, got {show(values)}"]
    if len(values) > MAX_FIELDS:
        return {}, [f"{what} has {len(values)} fields, at most {MAX_FIELDS} are allowed"]
    out: dict[str, Any] = {}
    reasons: list[str] = []
    for key, value in values.items():
        parser = schema.get(key) if isinstance(key, str) else None
        if parser is None:
            reasons.append(f"{what} has an unknown field {show(key)}")
            continue
        try:
            out[key] = parser(value)
        except Rejected as exc:
            reasons.append(f"{what} field '{key}' {exc}")
    reasons += [f"{what} has no '{key}'" for key in required if key not in out and key not in values]
    if (
        not reasons
        and {"partition-id", "num-partitions"} <= out.keys()
        and out["partition-id"] >= out["num-partitions"]
    ):
        reasons.append(f"{what} has partition-id {out['partition-id']} outside 0..num-partitions-1")
    return out, reasons


def parse_client_record(
    values: Mapping[str, Any] | None, required: Iterable[str] = IDENTITY_REQUIRED
) -> tuple[dict[str, Any], list[str]]:
    """The client-info record, typed (:data:`CLIENT_FIELDS`), and the reasons to refuse it."""
    return parse_record(values, CLIENT_FIELDS, "client record", required)


def parse_site_check_record(values: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """A site's data check, typed (:data:`SITE_CHECK_FIELDS`; ``ok`` required), and the reasons to refuse it."""
    return parse_record(values, SITE_CHECK_FIELDS, "site check", required=("ok",))


def parse_train_metrics(
    values: Mapping[str, Any] | None, limits: ReplyLimits, client: Mapping[str, Any] | None = None
) -> tuple[dict[str, float | int], list[str]]:
    """The train metrics, typed, with ``num-examples`` within the run's and the client's own bounds.

    ``num-examples`` may not exceed ``limits.max_examples``, the ``num-train`` of this
    reply's ``client`` record, nor ``limits.known_train``.
    """
    metrics, reasons = parse_record(values, TRAIN_METRICS, "metrics", required=("num-examples",))
    count = metrics.get("num-examples")
    if reasons or count is None:
        return metrics, reasons
    bounds = [(limits.max_examples, "max-client-examples")]
    if client and "num-train" in client:
        bounds.append((client["num-train"], "the num-train in its client record"))
    if limits.known_train is not None:
        bounds.append((limits.known_train, "the num-train it reported when it identified itself"))
    for bound, name in bounds:
        if count > bound:
            reasons.append(f"num-examples {count} exceeds {name} ({bound})")
    return metrics, reasons


def parse_evaluate_metrics(
    values: Mapping[str, Any] | None, limits: ReplyLimits
) -> tuple[dict[str, float | int], list[str]]:
    """The evaluate metrics, typed; ``num-examples`` and ``test-num-examples`` at most ``limits.max_examples``
    and at most the ``num-val`` and ``num-test`` the client reported before (``limits.known_val``,
    ``limits.known_test``), where it did."""
    metrics, reasons = parse_record(values, EVALUATE_METRICS, "metrics", required=("num-examples",))
    for key, known, name in (
        ("num-examples", limits.known_val, "num-val"),
        ("test-num-examples", limits.known_test, "num-test"),
    ):
        count = metrics.get(key, 0)
        if reasons:
            break
        if count > limits.max_examples:
            reasons.append(f"{key} {count} exceeds max-client-examples ({limits.max_examples})")
        elif known is not None and count > known:
            reasons.append(f"{key} {count} exceeds the {name} it reported when it identified itself ({known})")
    return metrics, reasons


def _count_vector(value: Any, what: str, length: int | None = None) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise Rejected(f"{what} must be a list of counts, got {show(value)}")
    if not 1 <= len(value) <= MAX_ENTRIES:
        raise Rejected(f"{what} must hold 1..{MAX_ENTRIES} counts, got {len(value)}")
    if length is not None and len(value) != length:
        raise Rejected(f"{what} must hold {length} counts, got {len(value)}")
    return np.array([COUNT(v) for v in value], dtype=np.int64)


def parse_counts(
    usage: Mapping[str, Any] | None, pattern_usage: Mapping[str, Any] | None, pools: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """``(usage, pattern usage, reasons)``: per pool of ``pools``, non-negative integer counts.

    ``usage[pool]`` is a ``(pool size,)`` int64 vector; ``pattern_usage[pool]`` the flat
    ``(3 * pool size)`` list back in shape ``(3, pool size)``. Whether the sizes match the
    pools and the tables add up is :func:`~fedprime_core.method.federated.validate_update`'s.
    """
    reasons: list[str] = []
    out_usage: dict[str, np.ndarray] = {}
    out_patterns: dict[str, np.ndarray] = {}
    for name, record, into in (("usage", usage, out_usage), ("pattern-usage", pattern_usage, out_patterns)):
        if record is None:
            continue
        if not isinstance(record, Mapping) or len(record) > MAX_FIELDS:
            reasons.append(f"{name} must be a record of at most {MAX_FIELDS} pools, got {show(record)}")
            continue
        for pool, value in record.items():
            if not isinstance(pool, str) or pool not in pools:
                reasons.append(f"{name} names a pool {show(pool)} this method does not have")
                continue
            try:
                if into is out_usage:
                    into[pool] = _count_vector(value, f"{name} of pool '{pool}'")
                elif pool in out_usage:
                    size = out_usage[pool].shape[0]
                    flat = _count_vector(value, f"{name} of pool '{pool}'", NUM_PATTERNS * size)
                    into[pool] = flat.reshape(NUM_PATTERNS, size)
                else:
                    reasons.append(f"{name} of pool '{pool}' comes without usage counts for that pool")
            except Rejected as exc:
                reasons.append(str(exc))
    return out_usage, out_patterns, reasons


def clean_line(value: Any, limit: int = MAX_LOG_CHARS) -> str:
    """A client's log line as one printable line: control characters (ANSI escapes, line breaks) shown as ``?``."""
    text = printable(value[: limit + 1]) if isinstance(value, str) else show(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_client_log(lines: Any, levels: Any) -> list[tuple[int, str]]:
    """``[(level, line), ...]`` of a reply's ``client-log`` record: at most :data:`MAX_LOG_LINES`
    printable lines, each level clamped to DEBUG..CRITICAL (INFO where it is not an integer)."""
    if not isinstance(lines, (list, tuple)):
        return []
    levels = levels if isinstance(levels, (list, tuple)) else []
    out = []
    for i, line in enumerate(lines[:MAX_LOG_LINES]):
        level = levels[i] if i < len(levels) else INFO
        if isinstance(level, bool) or not isinstance(level, int):
            level = INFO
        out.append((min(max(level, DEBUG), CRITICAL), clean_line(line)))
    if len(lines) > MAX_LOG_LINES:
        out.append((INFO, f"... {len(lines) - MAX_LOG_LINES} more line(s) not shown"))
    return out
