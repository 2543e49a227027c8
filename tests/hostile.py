"""Hostile and broken client replies, and one training round of the server's reply path to feed them to.

A :class:`ReplyRound` is the server's side of one round for a method, without Flower's network:
honest replies of three nodes, plus whatever a fourth node sends, go through what a real round
does with them (the client's log lines, ``parse_train_reply``, ``validate_update``, the
aggregation, the round record and ``RunOutputs.persist``: metrics, summary, clients.json, checkpoint).
:func:`mutations` draws what a hostile or broken fourth client may send: any value Flower can
carry (integers of any size, NaN, bytes, strings with control characters, lists) under known
or unknown keys of every record, arrays of any dtype and shape, records left out.

Used by ``tests/test_reply_fuzz.py`` and ``benchmarks/reply_fuzz.py`` (which also runs it
against older commits: it only needs the strategy's hooks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprime_core.config import parse_run_config
from fedprime_protocol.logs import log_client_lines
from fedprime_protocol.messages import instruction_content, train_reply_content

METHODS = ("fedprime", "fed-intra", "fed-inter", "fedavg-p", "pfpt", "fedprox-p", "centralized-p")
HONEST = (1, 2, 3)
HOSTILE = 4
FINGERPRINT, LABELS = "0123456789abcdef", "fedcba9876543210"
CLIENT_FIELDS = (
    "client-id",
    "partition-id",
    "num-partitions",
    "data",
    "num-train",
    "num-val",
    "mixture",
    "complete",
    "text-missing",
    "image-missing",
    "backbone-fingerprint",
    "labels-fingerprint",
)
METRIC_NAMES = ("num-examples", "train-loss", "train-regulariser", "train-seconds", "steps")

_STATES: dict[str, dict[str, np.ndarray]] = {}


def initial_state(method: str) -> dict[str, np.ndarray]:
    """The method's real initial global state on the tiny backbone (built once per process)."""
    if method not in _STATES:
        from fedprime_core import runtime

        _STATES[method] = runtime.initial_state(config(method, Path(".")))
    return _STATES[method]


def config(method: str, results: Path):
    return parse_run_config(
        {
            "method": method,
            "tau": 6,
            "kappa": 2,
            "results-dir": str(results),
            "run-name": "fuzz",
            "min-train-nodes": 1,
            "min-available-nodes": 1,
            "align-sweeps": 2,  # the reply path, not the alignment's quality, is under test
        }
    )


def client_record(node: int) -> dict[str, Any]:
    return {
        "client-id": str(node - 1),
        "partition-id": node - 1,
        "num-partitions": 4,
        "data": "partition",
        "num-train": 100 + node,
        "num-val": 20,
        "mixture": [0.5, 0.3, 0.2],
        "complete": 50,
        "text-missing": 30,
        "image-missing": 20 + node,
        "backbone-fingerprint": FINGERPRINT,
        "labels-fingerprint": LABELS,
    }


class ReplyRound:
    """Round 1 of ``method`` on a fresh strategy whose run folder is ``run_dir``."""

    def __init__(self, method: str, run_dir: Path) -> None:
        from server_app.strategy import FedPrimeStrategy

        try:
            from server_app.transport import Dispatch
        except ImportError:  # a commit before the strategy was split by concern (benchmarks/reply_fuzz.py)
            from server_app.strategy import Dispatch

        TaskIdentity.task_id = TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        self.cfg = config(method, run_dir.parent)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.strategy = FedPrimeStrategy(
            self.cfg,
            run_dir,
            initial_state(method),
            server_fingerprint=FINGERPRINT,
            labels_fingerprint=LABELS,
        )
        nodes = (*HONEST, HOSTILE)
        identities = getattr(self.strategy, "identities", self.strategy)  # older commits: on the strategy
        self.arrays, messages = {}, []
        for node in nodes:
            client = str(node - 1)
            identities.node_clients[node] = client  # every method identifies its nodes before it samples them
            self.arrays[node] = self.strategy.model.client_arrays(client)
            message = Message(
                content=instruction_content(self.arrays[node], ConfigRecord({"server-round": 1})),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            message.metadata.__dict__["_message_id"] = f"train-{node}"
            messages.append(message)
        self.sent = messages
        sent = Dispatch(
            messages=tuple(messages),
            clients={n: (identities.node_clients.get(n)) for n in nodes},
            arrays=self.arrays,
            sampled=len(nodes),
        )
        setattr(self.strategy, "train_sent" if hasattr(self.strategy, "train_sent") else "_train_sent", sent)

    def reply_parts(self, node: int) -> dict[str, Any]:
        """What an honest client ``node`` sends, as plain values (records by name)."""
        rng = np.random.default_rng(node)
        state = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in self.arrays[node].items()}
        shapes = self.strategy.model.expected_shapes()
        usage = {p: [3] * shapes[f"pools.{p}.prompts"][0] for p in self.strategy.spec.pools}
        return {
            "arrays": state,
            "metrics": {"num-examples": 90 + node, "train-loss": 1.0 + node / 10, "train-seconds": 1.5, "steps": 3},
            "usage": usage,
            "pattern-usage": {p: counts + [0] * (2 * len(counts)) for p, counts in usage.items()},
            "client": client_record(node),
            "wire": {"dtype": "float32", "delta": False},
            "client-log": {"client": str(node - 1), "levels": [20], "lines": [f"round 1: loss on {node}"]},
        }

    def message(self, node: int, parts: dict[str, Any]) -> Message:
        """The reply of ``node`` made of ``parts`` (a record left out when its part is absent)."""
        content = RecordDict()
        for name, value in parts.items():
            if name == "arrays":
                content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in value.items()})
            elif name == "metrics":
                content[name] = MetricRecord(value)
            else:
                content[name] = ConfigRecord(value)
        return Message(content=content, reply_to=self.sent[node - 1])

    def honest(self, node: int) -> Message:
        parts = self.reply_parts(node)
        return Message(
            content=train_reply_content(
                parts["arrays"],
                parts["metrics"],
                {p: np.asarray(c) for p, c in parts["usage"].items()},
                parts["client"],
                {p: np.asarray(t).reshape(3, -1) for p, t in parts["pattern-usage"].items()},
            ),
            reply_to=self.sent[node - 1],
        )

    def run(self, replies: list[Message]) -> dict[str, Any]:
        """The round on ``replies``: what the server does with them, up to the files it writes.

        Returns the round's outcome: the global arrays, the clients' record, the round record
        and the node's statuses (``node -> accepted/rejected/timed-out``).
        """
        for reply in replies:
            log_client_lines(reply)
        strategy = self.strategy
        strategy.aggregate_train(1, replies)
        trained = strategy.trained if hasattr(strategy, "trained") else strategy._trained
        record = {"round": 1, "sampled": 4, **trained.row(), "round-seconds": 0.0}
        strategy.history.append(record)
        persist = strategy.outputs.persist if hasattr(strategy, "outputs") else strategy._persist
        persist(1, "fuzz", "running")
        return {
            "arrays": {k: v.copy() for k, v in strategy.model.arrays.items()},
            "inter-pool": json.dumps(strategy.model.record(), sort_keys=True, default=str),
            "clients": json.loads((strategy.run_dir / "clients.json").read_text(), parse_constant=_no_constant),
            "metrics": json.loads((strategy.run_dir / "metrics.json").read_text(), parse_constant=_no_constant),
            "status": {o.node: o.status for o in trained.outcomes},
            "train-loss": trained.train_loss,
        }


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} in a JSON file: not valid JSON")


# -- what a hostile client sends -------------------------------------------------------------
_odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["", "²", "³", "①", "٣", "0" * 80, "a\nFedPrime finished", "\x1b[31mred", "\u202eevil", "../../etc", " 1"]
)
_odd_int = st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 2**62, 2**63, 10**5000, 10**12 + 1])
_odd_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e300, -0.0, 5e-324])
_scalar = st.one_of(_odd_int, _odd_float, _odd_text, st.binary(max_size=8), st.booleans())
#: Anything a ConfigRecord carries: a scalar or a homogeneous list of one scalar kind.
config_value = st.one_of(
    _scalar,
    st.lists(_odd_int, max_size=40),
    st.lists(_odd_float, max_size=8),
    st.lists(_odd_text, max_size=4),
    st.lists(st.binary(max_size=4), max_size=3),
    st.lists(st.booleans(), max_size=8),
)
#: Anything a MetricRecord carries.
metric_value = st.one_of(_odd_int, _odd_float, st.lists(_odd_int, max_size=6), st.lists(_odd_float, max_size=6))
_key = st.text(max_size=12)
_array = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.uint16, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=7),
    elements=None,
)


@st.composite
def mutations(draw) -> list[tuple]:
    """One to three changes to an honest reply: ``(part, key, value)`` set, ``(part, key)`` removed,
    ``(part,)`` left out whole."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["client", "metrics", "usage", "pattern-usage", "wire", "arrays", "log", "drop"]))
        if kind == "client":
            key = draw(st.sampled_from(CLIENT_FIELDS) | _key)
            ops.append(("client", key, draw(config_value)) if draw(st.integers(0, 5)) else ("client", key))
        elif kind == "metrics":
            key = draw(st.sampled_from(METRIC_NAMES) | _key)
            ops.append(("metrics", key, draw(metric_value)) if draw(st.integers(0, 5)) else ("metrics", key))
        elif kind in ("usage", "pattern-usage"):
            ops.append((kind, draw(st.sampled_from(["intra", "inter"]) | _key), draw(config_value)))
        elif kind == "wire":
            ops.append(("wire", draw(st.sampled_from(["dtype", "delta"]) | _key), draw(config_value)))
        elif kind == "arrays":
            ops.append(("arrays", draw(st.sampled_from(["head.0.weight", "pools.inter.prompts"]) | _key), draw(_array)))
        elif kind == "log":
            ops.append(("client-log", draw(st.sampled_from(["lines", "levels", "client"])), draw(config_value)))
        else:
            ops.append((draw(st.sampled_from(["arrays", "metrics", "client", "usage", "pattern-usage", "wire"])),))
    return ops


def apply(parts: dict[str, Any], ops: list[tuple]) -> dict[str, Any]:
    """``parts`` with the changes ``ops`` (:meth:`ReplyRound.message` raises ``TypeError`` or
    ``ValueError`` where Flower itself would refuse to carry the result)."""
    parts = {name: dict(value) for name, value in parts.items()}
    for op in ops:
        if len(op) == 1:
            parts.pop(op[0], None)
        elif len(op) == 2:
            parts.get(op[0], {}).pop(op[1], None)
        else:
            parts.setdefault(op[0], {})[op[1]] = op[2]
    return parts


def is_finite_state(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


def same_outcome(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The global arrays (to the bit), the personal pools, clients.json and the train loss agree."""
    if a["arrays"].keys() != b["arrays"].keys():
        return False
    if not all(np.array_equal(a["arrays"][k], b["arrays"][k]) for k in a["arrays"]):
        return False
    loss_a, loss_b = a["train-loss"], b["train-loss"]
    same_loss = loss_a == loss_b or (isinstance(loss_a, float) and math.isnan(loss_a) and math.isnan(loss_b))
    return a["inter-pool"] == b["inter-pool"] and a["clients"] == b["clients"] and same_loss


__all__ = ["METHODS", "ReplyRound", "apply", "is_finite_state", "mutations", "same_outcome"]
