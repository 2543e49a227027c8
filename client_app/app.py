"""The FedPrime ClientApp: train and evaluate the global prompts on this node's local data.

The node config says where the data is (:func:`fedprime_core.runtime.node_client`): a
site's own folder (``data-dir``, set by ``flower-supernode --node-config``), or a shard
(``partition-id`` / ``num-partitions``, set by the simulation engine) of the run's
data-dir. Only the trainable parts travel back, with the sample count, the prompt usage
counts, the client's identity and its realised missing-pattern counts; never the
backbone, never data. The backbone and the data are loaded once per process and cached.

Arrays arrive in the server's wire encoding and are decoded to float32; the reply is
encoded in this run's ``wire-dtype``, as the change to what arrived when ``upload-delta``
is on (:mod:`fedprime_core.wire`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedprime_core import runtime
from fedprime_core.config import parse_run_config
from fedprime_core.failures import exception_reason
from fedprime_core.tools.faults import inject_fault
from fedprime_protocol.logs import connect, forward_logs
from fedprime_protocol.messages import (
    evaluate_reply_content,
    identity_reply_content,
    read_arrays,
    read_server_round,
    train_reply_content,
)

LOGGER = logging.getLogger(__name__)
connect(client=True)  # this app's and fedprime_core's lines: to Flower's console and, with each reply, the server

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def reports_errors(handler: Handler) -> Handler:
    """Turn an exception into an error reply whose reason is one line the server can record.

    The reason is ``"[config] ConfigError: ..."`` / ``"[data] DataError: ..."`` for errors
    that recur until someone fixes a setting or a file (the server stops a run in which
    every client fails that way), else ``"Type: message"``. The full traceback goes to
    this node's log, not over the network.
    """

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply the server can account for
            LOGGER.exception("%s failed on node %s", handler.__name__, context.node_id)
            reason = exception_reason(exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return wrapped


def _threads() -> None:
    # Simulation packs several clients on few cores; never oversubscribe them.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))


@app.query()
@reports_errors
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (asked before round 1, and before its first personal pool)."""
    node = runtime.node_client(context.node_config, context.node_id)
    return Message(content=identity_reply_content(node.describe()), reply_to=msg)


@app.train()
@reports_errors
@forward_logs
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-epochs`` on the local shard."""
    _threads()
    cfg = parse_run_config(context.run_config)
    node = runtime.node_client(context.node_config, context.node_id)
    server_round = read_server_round(msg.content)
    state = read_arrays(msg.content)
    new_state, result, shard = runtime.client_train(cfg, state, node, server_round=server_round)
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-regulariser": result.regulariser,
        "train-seconds": result.seconds,
        "steps": result.steps,
    }
    client = runtime.client_info(cfg, node, shard)
    partition = -1 if node.partition_id is None else node.partition_id  # fault plans name partitions
    new_state, metrics, usage = inject_fault(cfg.fault_plan, partition, server_round, new_state, metrics, result.usage)
    LOGGER.info(
        "round %d: loss %.4f on %d samples in %.1fs",
        server_round,
        result.loss,
        result.num_examples,
        result.seconds,
    )
    content = train_reply_content(
        new_state,
        metrics,
        usage,
        client,
        result.pattern_usage,
        wire_dtype=cfg.wire_dtype,
        reference=state if cfg.upload_delta else None,
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@reports_errors
@forward_logs
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received state (this client's own inter pool where the method keeps one) on the local
    validation split and the client's own test set."""
    _threads()
    cfg = parse_run_config(context.run_config)
    node = runtime.node_client(context.node_config, context.node_id)
    metrics = runtime.client_evaluate(cfg, read_arrays(msg.content), node)
    return Message(content=evaluate_reply_content(metrics, node.describe()), reply_to=msg)
