"""The FedPrime ClientApp: train and evaluate the global prompts on this node's local shard.

Each node holds its own shard (``partition-id`` / ``num-partitions`` from the node config,
set by the simulation engine or by ``flower-supernode --node-config``) with its own
missing-modality mixture. Only the trainable parts travel back, with the sample count,
the prompt usage counts and the realised missing-pattern counts; never the backbone,
never data. The backbone and the shard are loaded once per process and cached.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprime_core import runtime
from fedprime_core.config import ConfigError, RunConfig, parse_run_config
from fedprime_core.faults import inject_fault
from server_app.logs import connect, forward_logs
from server_app.messages import ARRAYS, CONFIG, METRICS, record_to_state, train_reply_content

LOGGER = logging.getLogger(__name__)
connect(client=True)  # this app's and fedprime_core's lines: to Flower's console and, with each reply, the server

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


@app.train()
@forward_logs
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
        "partition-id": partition_id,
        "num-train": len(shard.train),
        "mixture": [float(x) for x in shard.mixture],
        "backbone-fingerprint": runtime.load_backbone(cfg).fingerprint,
        **shard.counts,
    }
    new_state, metrics, usage = inject_fault(
        cfg.fault_plan, partition_id, server_round, new_state, metrics, result.usage
    )
    LOGGER.info(
        "round %d: loss %.4f on %d samples in %.1fs",
        server_round,
        result.loss,
        result.num_examples,
        result.seconds,
    )
    return Message(content=train_reply_content(new_state, metrics, usage, client), reply_to=msg)


@app.evaluate()
@forward_logs
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
