"""The FedPrime ClientApp: train and evaluate the global prompts on this node's local shard.

Each node holds its own shard (``partition-id`` / ``num-partitions`` from the node config,
set by the simulation engine or by ``flower-supernode --node-config``) with its own
missing-modality mixture. Only the trainable parts travel back, with the sample count,
the prompt usage counts and the realised missing-pattern counts; never the backbone,
never data. The backbone and the shard are loaded once per process and cached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedprime_core import runtime
from fedprime_core.config import ConfigError, RunConfig, parse_run_config
from fedprime_core.failures import exception_reason
from fedprime_core.faults import inject_fault
from fedprime_core.federated import client_identity
from server_app.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    identity_reply_content,
    record_to_state,
    train_reply_content,
)

LOGGER = logging.getLogger(__name__)

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


def node_partition(context: Context, cfg: RunConfig) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node, with a clear error if absent."""
    node = context.node_config
    try:
        partition_id, num_partitions = int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as exc:
        raise ConfigError(
            f"node config lacks {exc.args[0]!r}; start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config partition-id={partition_id} must lie in 0..num-partitions-1 ({num_partitions - 1})"
        )
    return partition_id, num_partitions


def _threads() -> None:
    # Simulation packs several clients on few cores; never oversubscribe them.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))


def identity(context: Context) -> dict[str, str | int]:
    """This node's client id (what the server keys its personal pool by) and partition."""
    info: dict[str, str | int] = {"client-id": client_identity(context.node_config, context.node_id)}
    if "partition-id" in context.node_config:
        info["partition-id"] = int(context.node_config["partition-id"])
    return info


@app.query()
@reports_errors
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (asked once, before its first personal pool)."""
    return Message(content=identity_reply_content(identity(context)), reply_to=msg)


@app.train()
@reports_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-epochs`` on the local shard."""
    _threads()
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context, cfg)
    server_round = int(msg.content[CONFIG].get("server-round", 0))
    state = record_to_state(msg.content[ARRAYS])
    new_state, result, shard = runtime.client_train(cfg, state, partition_id, num_partitions, server_round)
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-regulariser": result.regulariser,
        "train-seconds": result.seconds,
        "steps": result.steps,
    }
    client = {
        **identity(context),
        "num-train": len(shard.train),
        "mixture": [float(x) for x in shard.mixture],
        "backbone-fingerprint": runtime.load_backbone(cfg).fingerprint,
        **shard.counts,
    }
    new_state, metrics, usage = inject_fault(
        cfg.fault_plan, partition_id, server_round, new_state, metrics, result.usage
    )
    LOGGER.info(
        "client %d round %d: loss %.4f on %d samples in %.1fs",
        partition_id,
        server_round,
        result.loss,
        result.num_examples,
        result.seconds,
    )
    content = train_reply_content(new_state, metrics, usage, client, result.pattern_usage)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@reports_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global state on the local validation split."""
    _threads()
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context, cfg)
    metrics = runtime.client_evaluate(cfg, record_to_state(msg.content[ARRAYS]), partition_id, num_partitions)
    metrics = {k: float(v) for k, v in metrics.items() if k != "num-examples"} | {
        "num-examples": int(metrics["num-examples"])
    }
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
