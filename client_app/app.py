"""The FedPrime ClientApp: train and evaluate the global prompts on this node's local shard.

Each node holds its own shard (``partition-id`` / ``num-partitions`` from the node config,
set by the simulation engine or by ``flower-supernode --node-config``) with its own
missing-modality mixture. Only the trainable parts travel back, with the sample count,
the prompt usage counts and the realised missing-pattern counts; never the backbone,
never data. The backbone and the shard are loaded once per process and cached.

Arrays arrive in the server's wire encoding and are decoded to float32; the reply is
encoded in this run's ``wire-dtype``, as the change to what arrived when ``upload-delta``
is on (:mod:`fedprime_core.wire`).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprime_core import runtime
from fedprime_core.config import ConfigError, RunConfig, parse_run_config
from fedprime_core.faults import inject_fault
from fedprime_core.federated import client_identity
from server_app.messages import (
    CONFIG,
    METRICS,
    identity_reply_content,
    read_arrays,
    train_reply_content,
)

LOGGER = logging.getLogger(__name__)

app = ClientApp()


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
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (asked once, before its first personal pool)."""
    return Message(content=identity_reply_content(identity(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-epochs`` on the local shard."""
    _threads()
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context, cfg)
    server_round = int(msg.content[CONFIG].get("server-round", 0))
    state = read_arrays(msg.content)
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
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global state on the local validation split."""
    _threads()
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context, cfg)
    metrics = runtime.client_evaluate(cfg, read_arrays(msg.content), partition_id, num_partitions)
    metrics = {k: float(v) for k, v in metrics.items() if k != "num-examples"} | {
        "num-examples": int(metrics["num-examples"])
    }
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
