"""Everything a client or server process needs for a run, loaded once per process.

The Flower apps are thin adapters over this module: a ClientApp turns its node config
into a :class:`ClientNode` (:func:`node_client`), asks for its :class:`ClientShard` and
calls :func:`client_train` / :func:`client_evaluate`; the ServerApp builds the initial
state and evaluates the global model with :func:`server_evaluate`.

A client's data comes one of two ways:

* **partitioned** (simulation; a deployment that shares one dataset): the node is
  ``partition-id`` of ``num-partitions`` and carves its shard out of the run config's
  ``data-dir`` (label partition, its own missing mixture, a local validation split);
* **site-local** (a real site): the node config names the site's own ``data-dir``; the
  client trains on all of its train split and validates on its dev split (or a
  ``val-fraction`` of train), nothing partitioned. The server then keeps only its own
  held-out folder (the run config's ``data-dir``), or none.

In both, rows that miss a modality in the data keep it, and a simulated mixture applies
on top only to complete rows (:func:`fedprime_core.data.missing.apply_missing`).

Loaded backbones, datasets, shards and models are cached per process (keyed by the
configuration values that determine them), so a simulation actor or a long-lived process
reads the backbone once, not every round.

Randomness: every draw (partitions, each client's missing mixture and patterns, test
patterns, initial prompts) comes from ``numpy.random.SeedSequence([seed, purpose, ...])``,
so it is a pure function of the run seed and the same in every process that computes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .backbones.base import Backbone
from .config import DATA_LAYOUTS, DEVICES, ConfigError, RunConfig, class_list, replace
from .data.missing import (
    TEST_SETTINGS,
    apply_missing,
    check_missing_table,
    client_mixtures,
    evaluation_mixture,
    load_missing_table,
    missing_counts,
    missing_table_entry,
    setting_mixture,
)
from .data.partition import partition
from .data.processing import MultimodalDataset, MultimodalProcessor, make_loader
from .data.records import DataError, DatasetSplits, Sample, primary_labels
from .federated import client_identity
from .methods import method_spec
from .model import PromptedModel, PromptSettings, load_trainable_state, trainable_state
from .progress import Progress, format_duration
from .training import TrainResult, TrainSettings, evaluate, train_local

LOGGER = logging.getLogger(__name__)

# Purposes mixed into SeedSequence so each kind of draw is independent of the others.
_SEED_SPLIT, _SEED_PARTITION, _SEED_MIXTURE, _SEED_PATTERNS, _SEED_TEST, _SEED_MODEL, _SEED_SHUFFLE = range(7)

_LOCK = threading.RLock()
_CACHE: dict[tuple, Any] = {}


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *purpose]))


def _cached(key: tuple, build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded backbone, dataset, shard and model of this process."""
    with _LOCK:
        _CACHE.clear()


def resolve_device(choice: str) -> torch.device:
    """``auto``: the first visible GPU (``CUDA_VISIBLE_DEVICES`` applies) or the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA GPU is visible to this process")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Backbone and data
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedBackbone:
    """A frozen backbone with its input processing and a fingerprint of its weights."""

    backbone: Backbone
    processor: MultimodalProcessor
    fingerprint: str


def backbone_fingerprint(backbone: Backbone) -> str:
    """Short SHA-256 of the frozen weights: clients and server must agree on it."""
    digest = hashlib.sha256()
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    for name, tensor in sorted(backbone.state_dict().items()):
        if name in trainable:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def text_length(cfg: RunConfig, splits: DatasetSplits | None = None) -> int:
    if cfg.text_max_length:
        return cfg.text_max_length
    if splits is not None:
        return splits.text_max_length
    return {"food101": 40, "mmimdb": 128}.get(cfg.dataset, 24)


def load_backbone(cfg: RunConfig) -> LoadedBackbone:
    """The frozen backbone named by ``backbone`` / ``model``, cached per process.

    A backbone that reads precomputed image features (``text-encoder``) gets a processor in
    feature mode whose ``(F, d_img)`` comes from the first training sample's features.
    """
    from . import backbones

    length = text_length(cfg)
    features = backbones.needs_image_features(cfg.backbone)
    key = ("backbone", cfg.backbone, cfg.model, length, cfg.image_size)
    if features:
        key += (cfg.image_projection, cfg.dataset, cfg.data_dir, cfg.data_layout, cfg.num_classes)

    def build() -> LoadedBackbone:
        started = time.perf_counter()
        if cfg.model not in ("tiny-vilt", "tiny-bert"):  # the tiny ones load in a second
            LOGGER.info("loading backbone %s (%s) ...", cfg.model, cfg.backbone)
        if features:
            from .features import feature_shape

            if not has_data(cfg):
                raise ConfigError(
                    f"backbone={cfg.backbone!r} reads the shape of the precomputed image features from the data, "
                    "but the run config names no data-dir for the server; give it its held-out folder (with features)"
                )

            splits = load_splits(cfg)
            shape = feature_shape([*splits.train, *splits.dev, *splits.test])
            parts = backbones.load_backbone(
                cfg.backbone,
                cfg.model,
                text_max_length=length,
                feature_dim=shape[1],
                image_projection=cfg.image_projection,
            )
            processor = MultimodalProcessor(
                parts.tokenizer, None, text_max_length=length, image_mode="features", feature_shape=shape
            )
        else:
            parts = backbones.load_backbone(cfg.backbone, cfg.model, text_max_length=length, image_size=cfg.image_size)
            processor = MultimodalProcessor(parts.tokenizer, parts.image_processor, text_max_length=length)
        backbone = parts.backbone
        fingerprint = backbone_fingerprint(backbone)
        LOGGER.info(
            "loaded backbone %s (%s) from %s in %s, fingerprint %s",
            cfg.model,
            cfg.backbone,
            parts.source,
            format_duration(time.perf_counter() - started),
            fingerprint,
        )
        return LoadedBackbone(backbone, processor, fingerprint)

    return _cached(key, build)


def _data_key(cfg: RunConfig) -> tuple:
    """The options that decide which rows are read (part of every data cache key)."""
    return (
        cfg.dataset,
        cfg.data_dir,
        cfg.data_layout,
        cfg.num_classes,
        cfg.classes,
        cfg.mmimdb_protocol,
        cfg.skip_bad_rows,
        cfg.seed,
    )


def _shard_key(cfg: RunConfig) -> tuple:
    """The options that decide how a client's rows become its train/validation datasets."""
    return (
        cfg.missing_setting,
        cfg.eta,
        cfg.missing_alpha,
        cfg.missing_table,
        cfg.val_fraction,
        cfg.max_train_samples,
        cfg.model,
        cfg.backbone,
        cfg.text_max_length,
        cfg.image_size,
    )


def load_splits(cfg: RunConfig) -> DatasetSplits:
    """The dataset's train/dev/test splits in ``cfg.data_dir``, cached per process.

    Every split file is optional here (a site folder holds train, a server's held-out folder
    dev and test); whoever needs a split says so with a clear error.
    """
    from .backbones import needs_image_features

    # The embedded set computes its generated image features only for a feature backbone.
    features = cfg.dataset == "embedded" and needs_image_features(cfg.backbone)
    key = ("splits", *_data_key(cfg), features)

    def build() -> DatasetSplits:
        started = time.perf_counter()
        if cfg.dataset == "embedded":
            from .data.embedded import make_embedded_dataset

            splits = make_embedded_dataset(cfg.seed, image_features=features)
        else:
            from .data.loaders import load_dataset

            # Every image is decoded here (once per process: the splits are cached), so a
            # corrupt one is an error naming its row (or a skipped, counted row with
            # skip-bad-rows) before training starts, never a client that fails in every round.
            splits = load_dataset(
                cfg.dataset,
                cfg.data_dir,
                layout=cfg.data_layout,
                num_classes=cfg.num_classes,
                skip_bad_rows=cfg.skip_bad_rows,
                verify_images=True,
                classes=class_list(cfg) or None,
                mmimdb_protocol=cfg.mmimdb_protocol,
                required=(),
            )
        LOGGER.info(
            "dataset %s: %d train / %d dev / %d test samples, %d classes, read in %s",
            cfg.dataset,
            len(splits.train),
            len(splits.dev),
            len(splits.test),
            splits.num_classes,
            format_duration(time.perf_counter() - started),
        )
        return splits

    return _cached(key, build)


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """What the model's head and the results need to know about the labels.

    Attributes:
        classes: class names (label ``i`` is ``classes[i]``).
        multilabel: multi-hot labels and BCE (MM-IMDB multilabel protocol).
        metric: the headline metric, ``"accuracy"`` or ``"macro_f1"``.
    """

    classes: tuple[str, ...]
    multilabel: bool
    metric: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """Short SHA-256 of the class list: every client and the server must agree on it."""
        return hashlib.sha256("\n".join(self.classes).encode()).hexdigest()[:16]


def has_data(cfg: RunConfig) -> bool:
    """Whether this process's configuration names data (the server: its held-out sets)."""
    return cfg.dataset == "embedded" or bool(cfg.data_dir)


def label_space(cfg: RunConfig) -> LabelSpace:
    """The run's label space: from the data in ``data-dir``, or from ``classes`` when there is none."""
    if has_data(cfg):
        splits = load_splits(cfg)
        return LabelSpace(tuple(splits.classes), splits.multilabel, splits.headline_metric)
    from .data.loaders import dataset_traits

    multilabel, metric, _ = dataset_traits(cfg.dataset, cfg.mmimdb_protocol)
    return LabelSpace(class_list(cfg), multilabel, metric)


def _train_and_server_val(cfg: RunConfig, splits: DatasetSplits) -> tuple[list[Sample], list[Sample]]:
    """Training pool (capped by max-train-samples) and the server's validation split.

    The dataset's dev split is the server's validation split; without one, a stratified
    ``val-fraction`` of train is held out for it (never seen by clients).
    """
    train = list(splits.train)
    dev = list(splits.dev)
    if not dev:
        rng = _rng(cfg.seed, _SEED_SPLIT)
        order = rng.permutation(len(train))
        cut = max(1, int(round(len(train) * max(cfg.val_fraction, 0.05))))
        dev = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    if cfg.max_train_samples and len(train) > cfg.max_train_samples:
        keep = _rng(cfg.seed, _SEED_SPLIT, 1).permutation(len(train))[: cfg.max_train_samples]
        train = [train[i] for i in sorted(keep)]
    return train, dev


def _cap(samples: list[Sample], limit: int, seed: int, purpose: int) -> list[Sample]:
    if not limit or len(samples) <= limit:
        return samples
    keep = _rng(seed, _SEED_SPLIT, purpose).permutation(len(samples))[:limit]
    return [samples[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------
# Client shards
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClientNode:
    """Who a ClientApp is and where its data comes from (read from its SuperNode's node config).

    Attributes:
        client_id: the client's identity: node config ``client-id``, else ``str(partition-id)``,
            else ``node-<node id>``; keys its results (``clients.json``) and, for a site,
            its seeds and missing-table entry.
        partition_id, num_partitions: the shard of the run's data-dir (partitioned mode).
        data_dir: the site's own data folder; set, the client is site-local.
        data_layout, device: this node's overrides of the run config keys ('' keeps them).
    """

    client_id: str
    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str = ""
    data_layout: str = ""
    device: str = ""

    @property
    def site_local(self) -> bool:
        return bool(self.data_dir)

    @property
    def seed_key(self) -> int:
        """This client's part of every seed: partition id + 1, or a stable hash of a site's id."""
        if not self.site_local and self.partition_id is not None:
            return self.partition_id + 1
        return int.from_bytes(hashlib.sha256(self.client_id.encode()).digest()[:4], "big")

    def describe(self) -> dict[str, Any]:
        """The identity fields of the client-info record, as the node knows them before it loads any data.

        ``client-id``, and ``partition-id`` and ``num-partitions`` for a partitioned node:
        the server's answer to "who are you" (``fedprime_protocol.messages.identity_query``).
        The record of a train reply is :meth:`ClientShard.describe` (same identity fields)
        plus the shard's counts.
        """
        out: dict[str, Any] = {"client-id": self.client_id}
        if self.partition_id is not None and self.num_partitions is not None:
            out.update({"partition-id": self.partition_id, "num-partitions": self.num_partitions})
        return out

    def config(self, cfg: RunConfig) -> RunConfig:
        """The run config as this node sees it: its own data-dir, layout and device."""
        changes = {}
        if self.site_local:
            if cfg.dataset == "embedded":
                raise ConfigError(
                    f"node config data-dir={self.data_dir!r} needs a dataset read from disk, but the run config "
                    'has dataset="embedded"; run with dataset="food101" or "mmimdb"'
                )
            changes["data-dir"] = self.data_dir
        if self.data_layout:
            changes["data-layout"] = self.data_layout
        if self.device:
            changes["device"] = self.device
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
    text("client-id")  # checked: a string if given
    return ClientNode(
        client_id=client_identity(node_config, node_id),
        partition_id=partition_id,
        num_partitions=num_partitions,
        data_dir=data_dir,
        data_layout=text("data-layout", DATA_LAYOUTS),
        device=text("device", DEVICES),
    )


@dataclasses.dataclass
class ClientShard:
    """One client's local data, with its own missing-modality mixture applied.

    Attributes:
        partition_id: the client's partition (``-1`` for the centralized owner and for a
            site without one).
        train, val: local training and validation sets.
        mixture: ``(3,)`` the simulated pattern mixture (complete, text-missing,
            image-missing) applied to the complete rows.
        counts: realised pattern counts of the training set, with their real and simulated
            parts (:func:`~fedprime_core.data.missing.missing_counts`).
        client_id: the client's identity.
        site_local: the data is the site's own folder (nothing partitioned).
        skipped_empty: training rows of the site's folder skipped for having no modality.
    """

    partition_id: int
    train: MultimodalDataset
    val: MultimodalDataset
    mixture: np.ndarray
    counts: dict[str, int]
    client_id: str = ""
    site_local: bool = False
    skipped_empty: int = 0

    def summary(self) -> str:
        """One readable line: sizes, the missing mixture and the realised pattern counts (real and simulated)."""
        mixture = " / ".join(f"{name} {share:.2f}" for name, share in zip(self.counts, self.mixture))
        counts = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        sizes = f"{len(self.train)} train / {len(self.val)} validation samples"
        line = f"{sizes}; missing mixture {mixture}; train patterns {counts}"
        if self.site_local and self.skipped_empty:
            line += f"; {self.skipped_empty} rows with neither text nor image skipped"
        return line

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client-id": self.client_id or str(self.partition_id)}
        if self.partition_id >= 0 or not self.site_local:
            out["partition-id"] = self.partition_id
        out.update(
            {
                "data": "site" if self.site_local else "partition",
                "num-train": len(self.train),
                "num-val": len(self.val),
                "mixture": [round(float(x), 4) for x in self.mixture],
                **self.counts,
            }
        )
        if self.site_local:
            out["skipped-no-modality"] = self.skipped_empty
        return out


def client_mixture_table(cfg: RunConfig, num_partitions: int) -> np.ndarray:
    """Every client's missing-pattern mixture, ``(num_partitions, 3)``."""
    if cfg.missing_table:
        return load_missing_table(cfg.missing_table, num_partitions)
    return client_mixtures(
        num_partitions, cfg.missing_setting, cfg.eta, cfg.missing_alpha, _rng(cfg.seed, _SEED_MIXTURE)
    )


def site_mixture(cfg: RunConfig, client: ClientNode) -> np.ndarray:
    """The simulated mixture of a site-local client, ``(3,)``.

    ``missing-table`` (keyed by ``client-id``, or ``partition-id`` when the node has one,
    else ``default``) when given; else ``missing-setting`` at ``eta`` with the client's own
    Dirichlet draw (``missing-alpha``), seeded by the run seed and the client's id.
    ``missing-setting="none"`` without a table: complete, the data is used as it is.
    """
    if cfg.missing_table:
        keys = [client.client_id] + ([str(client.partition_id)] if client.partition_id is not None else [])
        mixture, matched = missing_table_entry(cfg.missing_table, keys)
        LOGGER.info("client %s: simulated mixture of %s, entry %r", client.client_id, cfg.missing_table, matched)
        return mixture
    rng = _rng(cfg.seed, _SEED_MIXTURE, 1, client.seed_key)
    return client_mixtures(1, cfg.missing_setting, cfg.eta, cfg.missing_alpha, rng)[0]


def _dataset(
    cfg: RunConfig, samples: list[Sample], patterns: np.ndarray, loaded: LoadedBackbone, splits: DatasetSplits
) -> MultimodalDataset:
    in_memory = cfg.dataset == "embedded"
    return MultimodalDataset(
        samples, patterns, loaded.processor, splits.num_classes, splits.multilabel, cache_images=in_memory
    )


def _as_node(client: ClientNode | int, num_partitions: int | None) -> ClientNode:
    if isinstance(client, ClientNode):
        return client
    if num_partitions is None:
        raise ValueError("a partition id needs num_partitions")
    return ClientNode(client_id=str(client), partition_id=int(client), num_partitions=int(num_partitions))


def partition_train(cfg: RunConfig, train: Sequence[Sample], num_partitions: int) -> list[np.ndarray]:
    """Indices of every partition's share of the training pool (``num_partitions`` arrays).

    Raises:
        DataError: the pool cannot give every partition ``min-partition-size`` samples
            (a data error: it recurs until someone changes the data or the settings).
    """
    try:
        return partition(
            primary_labels(train),
            num_partitions,
            cfg.label_alpha,
            cfg.min_partition_size,
            cfg.seed,
            size_sigma=cfg.client_size_sigma,
        )
    except ValueError as exc:
        where = f"data-dir {cfg.data_dir!r}" if cfg.data_dir else f"the {cfg.dataset} dataset"
        cap = f", max-train-samples={cfg.max_train_samples}" if cfg.max_train_samples else ""
        raise DataError(
            f"{where} split into {num_partitions} partitions (min-partition-size={cfg.min_partition_size}{cap}): {exc}"
        ) from None


def check_server_inputs(cfg: RunConfig, num_partitions: int | None = None) -> LabelSpace:
    """Check before round 1 every input the server can read, as the clients would read it.

    The run config's ``missing-table`` (every entry), its ``data-dir`` (root, layout, class
    list and every row: :func:`load_splits`, images decoded), and, when the clients carve
    ``num_partitions`` shards out of that data, whether the training pool gives each one
    ``min-partition-size`` samples and the table an entry for each. A fault here would
    otherwise make every client fail in every round.

    Args:
        cfg: the run config.
        num_partitions: how many partitions the connected nodes say the data is split
            into; ``None`` when no node is partitioned (sites, or nobody asked yet).

    Returns:
        The run's label space.

    Raises:
        DataError: a file is absent or malformed, or the data is too small; the message
            names the file, the line or row, or the setting to change.
        ConfigError: the run config's class list cannot be used.
    """
    if cfg.missing_table:
        check_missing_table(cfg.missing_table)
        if num_partitions:
            load_missing_table(cfg.missing_table, num_partitions)
    labels = label_space(cfg)
    if num_partitions and has_data(cfg) and not method_spec(cfg.method).centralized:
        train, _ = _train_and_server_val(cfg, load_splits(cfg))
        partition_train(cfg, train, num_partitions)
    return labels


def client_shard(cfg: RunConfig, client: ClientNode | int, num_partitions: int | None = None) -> ClientShard:
    """The local data of a client (cached per process).

    Args:
        cfg: the run config.
        client: a :class:`ClientNode`, or a partition id (with ``num_partitions``).
        num_partitions: number of partitions when ``client`` is a partition id.

    A site-local client trains on its own folder (:func:`site_shard`). A partitioned one
    gets shard ``partition_id`` of ``num_partitions`` of the run's data; ``centralized-p``
    ignores the partition: its single owner holds all training data with the global
    missing mixture.
    """
    node = _as_node(client, num_partitions)
    cfg = node.config(cfg)
    if node.site_local:
        return site_shard(cfg, node)
    if not has_data(cfg):
        raise ConfigError(
            f"client {node.client_id}: a node with partition-id carves its shard out of the run config's data-dir, "
            "which is empty; set data-dir, or start the SuperNode with its own --node-config 'data-dir=\"...\"'"
        )
    spec = method_spec(cfg.method)
    partition_id, num_partitions = node.partition_id, node.num_partitions
    assert partition_id is not None and num_partitions is not None  # node_client guarantees it
    if not spec.centralized and not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    key = (
        "shard",
        *_data_key(cfg),
        cfg.method == "centralized-p",
        partition_id,
        num_partitions,
        node.client_id,
        cfg.label_alpha,
        cfg.client_size_sigma,
        cfg.min_partition_size,
        *_shard_key(cfg),
    )

    def build() -> ClientShard:
        splits = load_splits(cfg)
        loaded = load_backbone(cfg)
        train, _ = _train_and_server_val(cfg, splits)
        if spec.centralized:
            indices = np.arange(len(train))
            mixture = setting_mixture(cfg.missing_setting, cfg.eta)
            pid = -1
        else:
            indices = partition_train(cfg, train, num_partitions)[partition_id]
            mixture = client_mixture_table(cfg, num_partitions)[partition_id]
            pid = partition_id
        order = _rng(cfg.seed, _SEED_SPLIT, 2, pid + 1).permutation(indices)
        n_val = int(round(len(order) * cfg.val_fraction)) if len(order) > 1 else 0
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        train_samples = [train[i] for i in train_idx]
        val_samples = [train[i] for i in val_idx]
        train_patterns, natural = apply_missing(train_samples, mixture, _rng(cfg.seed, _SEED_PATTERNS, pid + 1, 0))
        val_patterns, _ = apply_missing(val_samples, mixture, _rng(cfg.seed, _SEED_PATTERNS, pid + 1, 1))
        shard = ClientShard(
            partition_id=pid,
            train=_dataset(cfg, train_samples, train_patterns, loaded, splits),
            val=_dataset(cfg, val_samples, val_patterns, loaded, splits),
            mixture=mixture,
            counts=missing_counts(train_patterns, natural),
            client_id=node.client_id if not spec.centralized else "centralized",
        )
        LOGGER.info("shard: %s", shard.summary())
        return shard

    return _cached(key, build)


def site_shard(cfg: RunConfig, client: ClientNode) -> ClientShard:
    """A site's own data (``cfg.data_dir``, the node's folder), nothing partitioned (cached per process).

    Train: the whole train split (capped by ``max-train-samples`` when set). Validation: the
    site's dev split, or a ``val-fraction`` of train when it has none. Missing modalities:
    the rows' own, plus :func:`site_mixture` simulated on the complete rows.

    Raises:
        DataError: the folder has no training rows.
    """
    key = ("site-shard", *_data_key(cfg), client.client_id, client.partition_id, *_shard_key(cfg))

    def build() -> ClientShard:
        splits = load_splits(cfg)
        if not splits.train:
            raise DataError(
                f"site {client.client_id}: {cfg.data_dir!r} holds no training rows; a site needs its train split "
                "(train.jsonl, or <dataset>_train.arrow) with at least one usable row"
            )
        loaded = load_backbone(cfg)
        train = _cap(list(splits.train), cfg.max_train_samples, cfg.seed, 10)
        if splits.dev:
            val = list(splits.dev)
        else:
            order = _rng(cfg.seed, _SEED_SPLIT, 2, client.seed_key).permutation(len(train))
            n_val = int(round(len(order) * cfg.val_fraction)) if len(order) > 1 else 0
            val = [train[i] for i in np.sort(order[:n_val])]
            train = [train[i] for i in np.sort(order[n_val:])]
        mixture = site_mixture(cfg, client)
        train_patterns, natural = apply_missing(train, mixture, _rng(cfg.seed, _SEED_PATTERNS, client.seed_key, 0))
        val_patterns, _ = apply_missing(val, mixture, _rng(cfg.seed, _SEED_PATTERNS, client.seed_key, 1))
        shard = ClientShard(
            partition_id=-1 if client.partition_id is None else client.partition_id,
            train=_dataset(cfg, train, train_patterns, loaded, splits),
            val=_dataset(cfg, val, val_patterns, loaded, splits),
            mixture=mixture,
            counts=missing_counts(train_patterns, natural),
            client_id=client.client_id,
            site_local=True,
            skipped_empty=int(splits.skipped_empty.get("train", 0)),
        )
        LOGGER.info("site data: %s", shard.summary())
        return shard

    return _cached(key, build)


def client_info(cfg: RunConfig, client: ClientNode, shard: ClientShard) -> dict[str, Any]:
    """What a client reports about itself with every update (the ``client`` record, ``clients.json``).

    Its identity, data mode, sample counts, mixture, realised pattern counts (real and
    simulated) and the fingerprints of its frozen backbone and of its class list. Never a
    path or a sample.
    """
    node_cfg = client.config(cfg)
    return {
        **shard.describe(),
        "backbone-fingerprint": load_backbone(node_cfg).fingerprint,
        "labels-fingerprint": label_space(node_cfg).fingerprint,
    }


# ---------------------------------------------------------------------------------------
# Model, training, evaluation
# ---------------------------------------------------------------------------------------
def prompt_settings(cfg: RunConfig) -> PromptSettings:
    return PromptSettings(
        tau=cfg.tau,
        kappa=cfg.kappa,
        length=cfg.prompt_length,
        selection=cfg.selection,
        map_length=cfg.map_prompt_length,
        map_depth=cfg.map_prompt_depth,
        query_rank=cfg.query_rank,
    )


def train_settings(cfg: RunConfig) -> TrainSettings:
    spec = method_spec(cfg.method)
    return TrainSettings(
        epochs=cfg.local_epochs,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lambda_reg=cfg.lambda_reg,
        proximal_mu=cfg.mu if spec.proximal else 0.0,
        max_grad_norm=cfg.max_grad_norm,
    )


def build_model(cfg: RunConfig) -> PromptedModel:
    """A fresh prompted model for the run (the initial global trainable state comes from it)."""
    loaded = load_backbone(cfg)
    labels = label_space(cfg)
    seed = int(np.random.SeedSequence([cfg.seed, _SEED_MODEL]).generate_state(1)[0])
    model = PromptedModel(
        loaded.backbone,
        method_spec(cfg.method),
        labels.num_classes,
        prompt_settings(cfg),
        seed=seed,
        train_pooler=cfg.exchange_pooler,
    )
    return model.to(resolve_device(cfg.device))


def process_model(cfg: RunConfig) -> PromptedModel:
    """The one model object this process reuses across rounds (its state is reloaded each call)."""
    key = (
        "model",
        cfg.backbone,
        cfg.model,
        cfg.image_projection,
        cfg.text_max_length,
        cfg.image_size,
        cfg.method,
        cfg.dataset,
        cfg.data_dir,
        cfg.num_classes,
        cfg.classes,
        cfg.mmimdb_protocol,
        prompt_settings(cfg),
        cfg.exchange_pooler,
        cfg.device,
    )
    return _cached(key, lambda: build_model(cfg))


def initial_state(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global trainable state before round 1 (deterministic for the seed)."""
    return trainable_state(build_model(cfg))


def client_train(
    cfg: RunConfig,
    state: Mapping[str, np.ndarray],
    client: ClientNode | int,
    num_partitions: int | None = None,
    server_round: int = 0,
) -> tuple[dict[str, np.ndarray], TrainResult, ClientShard]:
    """Load the global ``state``, train locally for one round, return the new state.

    ``client`` is a :class:`ClientNode` or a partition id (with ``num_partitions``).
    """
    node = _as_node(client, num_partitions)
    cfg = node.config(cfg)
    shard = client_shard(cfg, node)
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    loader = make_loader(
        shard.train,
        cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        seed=int(np.random.SeedSequence([cfg.seed, _SEED_SHUFFLE, node.seed_key, server_round]).generate_state(1)[0]),
    )
    result = train_local(model, loader, train_settings(cfg), multilabel=shard.train.multilabel, device=device)
    return trainable_state(model), result, shard


def client_evaluate(
    cfg: RunConfig, state: Mapping[str, np.ndarray], client: ClientNode | int, num_partitions: int | None = None
) -> dict[str, float]:
    """Evaluate the global ``state`` on the client's local validation split."""
    node = _as_node(client, num_partitions)
    cfg = node.config(cfg)
    shard = client_shard(cfg, node)
    model = process_model(cfg)
    load_trainable_state(model, state)
    loader = make_loader(shard.val, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    return evaluate(model, loader, shard.val.multilabel, resolve_device(cfg.device))


def _server_heldout(cfg: RunConfig, splits: DatasetSplits) -> tuple[list[Sample], list[Sample]]:
    """The server's validation and test samples (uncapped).

    Validation: the dev split; without one, the held-out part of train
    (:func:`_train_and_server_val`); in a held-out folder without train either, a
    ``val-fraction`` of the test split, disjoint from the test samples that remain.
    """
    test = list(splits.test)
    if not test:
        raise DataError(
            f"server-side evaluation needs a test split in data-dir {cfg.data_dir!r} (test.jsonl, or "
            f"{cfg.dataset}_test.arrow); add one or run with server-eval=false"
        )
    if splits.dev:
        return list(splits.dev), test
    if splits.train:
        return _train_and_server_val(cfg, splits)[1], test
    order = _rng(cfg.seed, _SEED_SPLIT, 5).permutation(len(test))
    cut = max(1, int(round(len(test) * max(cfg.val_fraction, 0.05)))) if len(test) > 1 else 0
    LOGGER.info("server: no dev or train split in %s; %d test samples become the validation split", cfg.data_dir, cut)
    return [test[i] for i in np.sort(order[:cut])], [test[i] for i in np.sort(order[cut:])]


def server_eval_sets(cfg: RunConfig) -> dict[str, MultimodalDataset]:
    """The server's held-out sets: ``val`` (same-as-train mixture) and the five test settings.

    Rows that miss a modality in the data keep it in every setting; each setting's mixture
    applies to the complete rows.
    """
    key = (
        "server-eval",
        cfg.dataset,
        cfg.data_dir,
        cfg.data_layout,
        cfg.num_classes,
        cfg.classes,
        cfg.mmimdb_protocol,
        cfg.seed,
        cfg.missing_setting,
        cfg.eta,
        cfg.max_test_samples,
        cfg.max_train_samples,
        cfg.val_fraction,
        cfg.model,
        cfg.backbone,
        cfg.text_max_length,
        cfg.image_size,
    )

    def build() -> dict[str, MultimodalDataset]:
        splits = load_splits(cfg)
        loaded = load_backbone(cfg)
        dev, test = _server_heldout(cfg, splits)
        dev = _cap(dev, cfg.max_test_samples, cfg.seed, 3)
        test = _cap(test, cfg.max_test_samples, cfg.seed, 4)
        val_mixture = setting_mixture(cfg.missing_setting, cfg.eta)
        val_patterns, _ = apply_missing(dev, val_mixture, _rng(cfg.seed, _SEED_TEST, 99))
        sets = {"val": _dataset(cfg, dev, val_patterns, loaded, splits)}
        for i, setting in enumerate(TEST_SETTINGS):
            mixture = evaluation_mixture(setting, cfg.missing_setting, cfg.eta)
            patterns, _ = apply_missing(test, mixture, _rng(cfg.seed, _SEED_TEST, i))
            sets[setting] = _dataset(cfg, test, patterns, loaded, splits)
        return sets

    return _cached(key, build)


def server_evaluate(
    cfg: RunConfig, state: Mapping[str, np.ndarray], what: str = "the held-out sets"
) -> dict[str, dict[str, float]]:
    """Metrics of the global ``state`` on the server's validation split and five test settings.

    ``what`` names the evaluation in progress lines (e.g. ``"round 3"``).
    """
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    multilabel = label_space(cfg).multilabel
    sets = server_eval_sets(cfg)
    # On a real dataset the six held-out sets take minutes: a line every 10 s says where it is.
    progress = Progress(f"evaluating {what}", sum(len(d) for d in sets.values()), unit="samples", logger=LOGGER)
    out = {}
    for name, data in sets.items():
        loader = make_loader(data, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
        out[name] = evaluate(model, _counted(loader, progress, name), multilabel, device)
    progress.close()
    return out


def _counted(batches: Iterable[Mapping[str, torch.Tensor]], progress: Progress, name: str) -> Iterator:
    """``batches`` unchanged, counting their samples into ``progress`` (current part ``name``)."""
    for batch in batches:
        yield batch
        progress.update(len(batch["labels"]), status=name)
