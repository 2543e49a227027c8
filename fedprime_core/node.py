"""A ClientApp's node and its effective config, computed once per message: light enough for a torch-free ClientApp.

A SuperNode's node config says who the client is and where its data comes from
(:func:`node_client`: a site's own ``data-dir``, or a shard of the run's data); the run
config says everything else. :func:`node_setup` turns the two into the config this node runs
with (:func:`node_config`: its own data-dir, layout and device), validated once; the
ClientApp passes the :class:`NodeSetup` down to the site that does the work
(:mod:`fedprime_core.site_worker`), and a site's resident worker makes its own from the same
two mappings. Nothing here imports torch: a ClientApp that hands its work to a worker
imports this and no learning code.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

from .config import DEVICES, ConfigError, RunConfig, parse_run_config, replace
from .data.datasets import DATA_LAYOUTS, DATASETS, dataset
from .identity import ClientNode, client_id_problem, client_identity


def node_config(node: ClientNode, cfg: RunConfig) -> RunConfig:
    """The run config as ``node`` sees it: its own data-dir, layout and device.

    A config that already is (:func:`node_setup` made it once) comes back as it is, not
    validated again.

    Raises:
        ConfigError: a site's own data-dir under a generated dataset (``dataset="embedded"``).
    """
    changes = {}
    if node.site_local:
        if dataset(cfg.dataset).generated:
            on_disk = [f'"{name}"' for name, spec in DATASETS.items() if not spec.generated]
            raise ConfigError(
                f"node config data-dir={node.data_dir!r} needs a dataset read from disk, but the run config "
                f'has dataset="{cfg.dataset}"; run with dataset={", ".join(on_disk[:-1])} or {on_disk[-1]}'
            )
        if cfg.data_dir != node.data_dir:
            changes["data-dir"] = node.data_dir
    if node.data_layout and cfg.data_layout != node.data_layout:
        changes["data-layout"] = node.data_layout
    if node.device and cfg.device != node.device:
        changes["device"] = node.device
    return replace(cfg, **changes) if changes else cfg


def node_client(node_config: Mapping[str, Any], node_id: int = 0) -> ClientNode:
    """The :class:`ClientNode` of a SuperNode's node config.

    A node config names either ``data-dir`` (site-local: the site's own data) or
    ``partition-id`` and ``num-partitions`` (a shard of the run's data-dir), and
    optionally ``client-id``, ``data-layout`` and ``device``.

    Raises:
        ConfigError: neither data nor partition given, or a value of the wrong type or range.
    """

    def text(key: str, choices: tuple[str, ...] | None = None) -> str:
        value = node_config.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"node config key {key!r} = {value!r} must be a string (--node-config '{key}=\"...\"')")
        if value and choices is not None and value not in choices:
            raise ConfigError(f"node config key {key!r} = {value!r} is not allowed; use one of: {', '.join(choices)}")
        return value

    data_dir = os.path.expanduser(text("data-dir"))
    if data_dir and not os.path.isabs(data_dir):
        raise ConfigError(
            f"node config key 'data-dir' = {data_dir!r} must be an absolute path: the ClientApp process that "
            "reads it may run in another folder than the SuperNode"
        )
    partition_id = num_partitions = None
    if "partition-id" in node_config or "num-partitions" in node_config:
        try:
            partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except KeyError as exc:
            raise ConfigError(f"node config lacks {exc.args[0]!r}; give both partition-id and num-partitions") from None
        except (TypeError, ValueError):
            raise ConfigError(
                f"node config partition-id={node_config['partition-id']!r} and "
                f"num-partitions={node_config['num-partitions']!r} must be integers"
            ) from None
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"node config partition-id={partition_id} must lie in 0..num-partitions-1 ({num_partitions - 1})"
            )
    if not data_dir and partition_id is None:
        raise ConfigError(
            "node config names no data: start the SuperNode with --node-config 'data-dir=\"/path/to/site\"' "
            "(this site's own data) or 'partition-id=<i> num-partitions=<n>' (a shard of the run's data-dir)"
        )
    explicit_id = text("client-id")
    problem = client_id_problem(explicit_id) if explicit_id else None
    if problem:  # the server would refuse every reply of this node: say so where it can be fixed
        raise ConfigError(f"node config key 'client-id': {problem}")
    return ClientNode(
        client_id=client_identity(node_config, node_id),
        partition_id=partition_id,
        num_partitions=num_partitions,
        data_dir=data_dir,
        data_layout=text("data-layout", DATA_LAYOUTS),
        device=text("device", DEVICES),
    )


@dataclasses.dataclass(frozen=True)
class NodeSetup:
    """What one message to a ClientApp runs with: the node, its effective config, and what they were read from.

    Attributes:
        run_cfg: the run config, validated: the run's own settings (``wire-dtype``, ``fault-plan``).
        node: who the client is and where its data comes from.
        run_config, node_config, node_id: as the ClientApp received them (a site's resident
            worker, another process, is sent these and makes its own setup).
    """

    run_cfg: RunConfig
    node: ClientNode
    run_config: Mapping[str, Any]
    node_config: Mapping[str, Any]
    node_id: int = 0

    @functools.cached_property
    def cfg(self) -> RunConfig:
        """The run config as this node sees it (:func:`node_config`), made on first use and kept.

        Raises:
            ConfigError: the node's data cannot go with the run config (a site's own data-dir
                under ``dataset="embedded"``); raised where the work is done, which a site check
                reports as the site's problem.
        """
        return node_config(self.node, self.run_cfg)


def node_setup(run_config: Mapping[str, Any], node_config: Mapping[str, Any], node_id: int = 0) -> NodeSetup:
    """A message's :class:`NodeSetup`, once: the run config parsed and the node config read.

    Raises:
        ConfigError: the run config or the node config cannot be used (which key, and why).
    """
    cfg = parse_run_config(run_config)
    return NodeSetup(cfg, node_client(node_config, node_id), dict(run_config), dict(node_config), int(node_id))
