"""The FedPrime ClientApp: train and evaluate the global prompts on this node's local data.

The node config says where the data is (:func:`fedprime_core.node.node_client`): a
site's own folder (``data-dir``, set by ``flower-supernode --node-config``), or a shard
(``partition-id`` / ``num-partitions``, set by the simulation engine) of the run's
data-dir. Every handler turns the run config and the node config into the node's effective
config once (:func:`fedprime_core.node.node_setup`) and passes it down. Only the trainable
parts travel back, with the sample count, the prompt usage counts, the client's identity and
its realised missing-pattern counts; never the backbone, never data. The work itself is
done by :mod:`fedprime_core.site_worker`: in this process (the backbone and the data cached
per process: a simulation actor keeps them), or, when the node config names
``site-worker``, by the site's resident worker, which keeps them for the whole run while
every message gets a fresh ClientApp process (deployment); this module then imports no torch.

Arrays arrive in the server's wire encoding and are decoded to float32; the reply is
encoded in this run's ``wire-dtype``, as the change to what arrived when ``upload-delta``
is on (:mod:`fedprime_core.wire`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedprime_core.failures import exception_reason
from fedprime_core.node import NodeSetup, node_setup
from fedprime_core.site_worker import WorkerFailure, site_for
from fedprime_core.tools.faults import inject_fault
from fedprime_protocol.logs import connect, forward_logs, forwarding_allowed
from fedprime_protocol.messages import (
    evaluate_reply_content,
    identity_reply_content,
    read_arrays,
    read_evaluate_first,
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
    every client fails that way), else ``"Type: message"``; a site worker's failure
    arrives with its reason already in that form. The full traceback goes to this node's
    log (the worker's own log for work it did), not over the network.
    """

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except WorkerFailure as exc:
            LOGGER.error("%s failed on node %s (in the site worker): %s", handler.__name__, context.node_id, exc.reason)
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply the server can account for
            LOGGER.exception("%s failed on node %s", handler.__name__, context.node_id)
            reason = exception_reason(exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return wrapped


def _setup(context: Context) -> NodeSetup:
    """This message's node and effective config (:func:`fedprime_core.node.node_setup`)."""
    return node_setup(context.run_config, context.node_config, context.node_id)


def _partition(context: Context) -> int:
    """This node's partition id, -1 for a site (fault plans name partitions)."""
    try:
        return int(context.node_config.get("partition-id", -1))
    except (TypeError, ValueError):
        return -1


@app.query()
@reports_errors
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is and, for a site, whether its data can be trained on.

    Asked before round 1 (and before a node's first round when it joins later). A site
    loads what training needs here, once: its resident worker keeps it for the run.
    """
    setup = _setup(context)
    site = site_for(context.node_config, context.run_id)
    answer = site.check(setup)
    check = answer["site-check"]
    if check is not None and not forwarding_allowed(dict(context.node_config)):
        check = {**check, "warnings": []}  # log lines stay home (forward-logs=false); problems still travel
    return Message(content=identity_reply_content(answer["client"], check), reply_to=msg)


@app.train()
@reports_errors
@forward_logs
def train(msg: Message, context: Context) -> Message:
    """Train the received global state for ``local-epochs`` on the local shard.

    When the message says ``evaluate-first`` (the server's client-side evaluation of the last
    round, sent with this round's training: one message cycle instead of two), the state as
    received is evaluated first, exactly as :func:`evaluate` would, and the reply carries it.
    """
    setup = _setup(context)
    cfg = setup.run_cfg  # the run's own settings; the site works with the node's view (setup.cfg)
    site = site_for(context.node_config, context.run_id)
    server_round = read_server_round(msg.content)
    state = read_arrays(msg.content)
    evaluation, evaluation_error = None, None
    if (evaluated_round := read_evaluate_first(msg.content)) is not None:
        # A failed evaluation costs that evaluation only, as a failed evaluate message would: train anyway.
        try:
            evaluation, _ = site.evaluate(setup, state)
            LOGGER.debug("round %d's state evaluated before training round %d", evaluated_round, server_round)
        except WorkerFailure as exc:
            LOGGER.error("evaluating round %d's state failed (in the site worker): %s", evaluated_round, exc.reason)
            evaluation_error = exc.reason
        except Exception as exc:  # noqa: BLE001 - reported with the training's reply
            LOGGER.exception("evaluating round %d's state failed", evaluated_round)
            evaluation_error = exception_reason(exc)
    outcome = site.train(setup, state, server_round)
    new_state, metrics, usage = inject_fault(
        cfg.fault_plan, _partition(context), server_round, outcome.state, dict(outcome.metrics), outcome.usage
    )
    LOGGER.info(
        "round %d: loss %.4f on %d samples in %.1fs",
        server_round,
        outcome.metrics["train-loss"],
        outcome.metrics["num-examples"],
        outcome.metrics["train-seconds"],
    )
    content = train_reply_content(
        new_state,
        metrics,
        usage,
        outcome.client,
        outcome.pattern_usage,
        wire_dtype=cfg.wire_dtype,
        reference=state if cfg.upload_delta else None,
        evaluation=evaluation,
        evaluation_error=evaluation_error,
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@reports_errors
@forward_logs
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received state (this client's own inter pool where the method keeps one) on the local
    validation split and the client's own test set."""
    setup = _setup(context)
    site = site_for(context.node_config, context.run_id)
    metrics, client = site.evaluate(setup, read_arrays(msg.content))
    return Message(content=evaluate_reply_content(metrics, client), reply_to=msg)
