"""Everything a client or server process needs for a run, loaded once per process.

The Flower apps are thin adapters over this module: a ClientApp turns its run and node
configs into its node and effective config once per message
(:func:`fedprime_core.node.node_setup`), asks for its
:class:`~fedprime_core.data.shards.ClientShard` (:func:`client_shard`) and calls
:func:`client_train` / :func:`client_evaluate` with them; the ServerApp checks its inputs
(:func:`check_server_inputs`), builds the initial state and evaluates the global model with
:func:`server_evaluate`.

Loaded backbones, datasets, shards and models are cached per process, so a simulation
actor or a long-lived process reads the backbone once, not every round. Each cache key is
:func:`fedprime_core.config.cache_key`: the values of the options that the options table
says affect that object. How the data becomes shards is :mod:`fedprime_core.data.shards`;
loading a backbone is :func:`fedprime_core.backbones.load_backbone`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import backbones
from .backbones import LoadedBackbone, needs_image_features
from .config import ConfigError, RunConfig, cache_key, class_list, text_length
from .data import shards
from .data.datasets import dataset as dataset_spec
from .data.missing import check_missing_table, load_missing_table
from .data.processing import MultimodalDataset, make_loader
from .data.records import DataError, DatasetSplits
from .data.shards import ClientShard, Draw, LabelSpace, draw_seed
from .devices import resolve_device
from .method.methods import method_spec
from .method.model import PromptedModel, load_trainable_state, trainable_state
from .method.training import TrainResult, evaluate, train_local
from .metrics import CLIENT_TEST_PREFIX
from .node import ClientNode, node_config
from .progress import Progress, format_duration
from .run_settings import prompted_model, shard_settings, train_settings

LOGGER = logging.getLogger(__name__)

_LOCK = threading.RLock()
_CACHE: dict[tuple, Any] = {}
_T = TypeVar("_T")
#: Backbones this process has loaded (a site's resident worker reports it: one per run, not per message).
_LOADS = {"backbone": 0}


def _cached(key: tuple, build: Callable[[], _T]) -> _T:
    """The object cached under ``key`` in this process, built by ``build`` the first time."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def backbone_loads() -> int:
    """How many times this process has loaded a backbone (cache misses of :func:`process_backbone`)."""
    return _LOADS["backbone"]


def forget_cached(keep: Iterable[str] = ("backbone",)) -> int:
    """Drop every cached object except those of the kinds in ``keep`` (:data:`~fedprime_core.config.CACHED_OBJECTS`).

    A long-lived process that serves run after run (a site's resident worker) calls it when a
    new run starts: a site's files may have been fixed since the last run and must be read
    again, while the frozen backbone stays loaded. Returns how many objects were dropped.
    """
    kinds = set(keep)
    with _LOCK:
        dropped = [key for key in _CACHE if key[0] not in kinds]
        for key in dropped:
            del _CACHE[key]
        return len(dropped)


# ---------------------------------------------------------------------------------------
# What a process loads once: backbone, splits, labels
# ---------------------------------------------------------------------------------------
def process_backbone(cfg: RunConfig) -> LoadedBackbone:
    """The frozen backbone named by ``backbone`` / ``model`` (:func:`fedprime_core.backbones.load_backbone`).

    A backbone that reads precomputed image features (``text-encoder``) gets a processor in
    feature mode whose ``(F, d_img)`` comes from the first training sample's features, so its
    cache key includes what decides the splits.
    """
    features = needs_image_features(cfg.backbone)
    key = cache_key(cfg, "backbone") + (cache_key(cfg, "splits") if features else ())

    def build() -> LoadedBackbone:
        _LOADS["backbone"] += 1
        if not features:
            return backbones.load_backbone(
                cfg.backbone, cfg.model, text_max_length=text_length(cfg), image_size=cfg.image_size
            )
        from .data.processing import feature_shape

        if not has_data(cfg):
            raise ConfigError(
                f"backbone={cfg.backbone!r} reads the shape of the precomputed image features from the data, "
                "but the run config names no data-dir for the server; give it its held-out folder (with features)"
            )
        splits = load_splits(cfg)
        return backbones.load_backbone(
            cfg.backbone,
            cfg.model,
            text_max_length=text_length(cfg),
            feature_shape=feature_shape([*splits.train, *splits.dev, *splits.test]),
            image_projection=cfg.image_projection,
        )

    return _cached(key, build)


def read_dataset(cfg: RunConfig, verify_images: bool) -> DatasetSplits:
    """The on-disk dataset ``cfg`` names, read as a run reads it (no cache; :func:`load_splits` caches).

    ``verify_images``: decode every image now (what a run does); ``False`` for tools that only
    count or select rows. Every split file is optional here.
    """
    from .data.loaders import load_dataset

    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        layout=cfg.data_layout,
        num_classes=cfg.num_classes,
        skip_bad_rows=cfg.skip_bad_rows,
        verify_images=verify_images,
        classes=class_list(cfg) or None,
        mmimdb_protocol=cfg.mmimdb_protocol,
        required=(),
    )


def load_splits(cfg: RunConfig) -> DatasetSplits:
    """The dataset's train/dev/test splits in ``cfg.data_dir``, cached per process.

    Every split file is optional here (a site folder holds train, a server's held-out folder
    dev and test); whoever needs a split says so with a clear error.
    """
    # The embedded set computes its generated image features only for a feature backbone.
    features = dataset_spec(cfg.dataset).generated and needs_image_features(cfg.backbone)

    def build() -> DatasetSplits:
        started = time.perf_counter()
        if dataset_spec(cfg.dataset).generated:
            from .data.embedded import make_embedded_dataset

            splits = make_embedded_dataset(cfg.seed, image_features=features)
        else:
            # Every image is decoded here (once per process: the splits are cached), so a
            # corrupt one is an error naming its row (or a skipped, counted row with
            # skip-bad-rows) before training starts, never a client that fails in every round.
            splits = read_dataset(cfg, verify_images=True)
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

    return _cached(cache_key(cfg, "splits"), build)


def has_data(cfg: RunConfig) -> bool:
    """Whether this process's configuration names data (the server: its held-out sets)."""
    return dataset_spec(cfg.dataset).generated or bool(cfg.data_dir)


def label_space(cfg: RunConfig) -> LabelSpace:
    """The run's label space: from the data in ``data-dir``, or from ``classes`` when there is none."""
    if has_data(cfg):
        splits = load_splits(cfg)
        return LabelSpace(tuple(splits.classes), splits.multilabel, splits.headline_metric)
    from .data.loaders import dataset_traits

    multilabel, metric, _ = dataset_traits(cfg.dataset, cfg.mmimdb_protocol)
    return LabelSpace(class_list(cfg), multilabel, metric)


# ---------------------------------------------------------------------------------------
# Client data
# ---------------------------------------------------------------------------------------
def _as_node(client: ClientNode | int, num_partitions: int | None) -> ClientNode:
    if isinstance(client, ClientNode):
        return client
    if num_partitions is None:
        raise ValueError("a partition id needs num_partitions")
    return ClientNode(client_id=str(client), partition_id=int(client), num_partitions=int(num_partitions))


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
        train, _ = shards.train_and_server_val(shard_settings(cfg), load_splits(cfg))
        shards.partition_train(shard_settings(cfg), train, num_partitions)
    return labels


def client_shard(cfg: RunConfig, client: ClientNode | int, num_partitions: int | None = None) -> ClientShard:
    """The local data of a client (cached per process).

    Args:
        cfg: the run config.
        client: a :class:`ClientNode`, or a partition id (with ``num_partitions``).
        num_partitions: number of partitions when ``client`` is a partition id.

    A site-local client trains on its own folder (:func:`fedprime_core.data.shards.site_shard`).
    A partitioned one gets shard ``partition_id`` of ``num_partitions`` of the run's data
    (:func:`fedprime_core.data.shards.partition_shard`); ``centralized-p`` ignores the
    partition: its single owner holds all training data with the global missing mixture.
    """
    node = _as_node(client, num_partitions)
    cfg = node_config(node, cfg)
    key = (*cache_key(cfg, "shard"), node.client_id, node.partition_id, node.num_partitions, node.site_local)
    if node.site_local:

        def build_site() -> ClientShard:
            shard = shards.site_shard(shard_settings(cfg), load_splits(cfg), process_backbone(cfg).processor, node)
            LOGGER.debug("site data: %s", shard.summary())  # the server logs it once per site (site_check)
            return shard

        return _cached(key, build_site)
    if not has_data(cfg):
        raise ConfigError(
            f"client {node.client_id}: a node with partition-id carves its shard out of the run config's data-dir, "
            "which is empty; set data-dir, or start the SuperNode with its own --node-config 'data-dir=\"...\"'"
        )
    centralized = method_spec(cfg.method).centralized
    partition_id, num_partitions = node.partition_id, node.num_partitions
    assert partition_id is not None and num_partitions is not None  # node_client guarantees it
    if not centralized and not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")

    def build() -> ClientShard:
        splits = load_splits(cfg)
        processor = process_backbone(cfg).processor
        shard = shards.partition_shard(
            shard_settings(cfg),
            splits,
            processor,
            partition_id,
            num_partitions,
            node.client_id,
            centralized=centralized,
        )
        LOGGER.info("shard: %s", shard.summary())
        return shard

    return _cached(key, build)


def client_info(cfg: RunConfig, client: ClientNode, shard: ClientShard) -> dict[str, Any]:
    """What a client reports about itself with every update (the ``client`` record, ``clients.json``).

    Its identity, data mode, sample counts, mixture, realised pattern counts (real and
    simulated) and the fingerprints of its frozen backbone and of its class list. Never a
    path or a sample.
    """
    node_cfg = node_config(client, cfg)
    return {
        **shard.describe(),
        "backbone-fingerprint": process_backbone(node_cfg).fingerprint,
        "labels-fingerprint": label_space(node_cfg).fingerprint,
    }


#: Most bad-row reasons a site check reports (the count says how many more there are).
MAX_PROBLEMS = 10


def site_check(cfg: RunConfig, client: ClientNode) -> dict[str, Any] | None:
    """Whether a site's data can be trained on, checked as training would read it (before round 1).

    Loads what training loads (the site's folder, its layout, class list, labels and every
    image; the backbone and its processor) through the process caches, so a process that
    serves the site's later messages (a resident worker, a simulation actor) has it ready.
    A partitioned node has nothing of its own to check (the server checks the run's data-dir):
    ``None``.

    Returns:
        ``ok``; ``problems``, one line each (a folder that does not exist, an unknown layout,
        a class outside the class list: every bad row when the first one stopped the load,
        up to :data:`MAX_PROBLEMS`); ``warnings`` (rows skipped with ``skip-bad-rows``); and
        for a usable site its client-info record (:func:`client_info`: counts, the counted
        ``mixture``, fingerprints), ``num-classes-present`` and a ``summary`` line.
    """
    if not client.site_local:
        return None
    try:
        shard = client_shard(cfg, client)
        info = client_info(cfg, client, shard)
    except (ConfigError, DataError, OSError, ValueError) as exc:
        problems = [_problem(exc)]
        if isinstance(exc, DataError) and not cfg.skip_bad_rows:
            problems += _other_bad_rows(node_config(client, cfg), problems[0])
        return {"ok": False, "problems": problems, "warnings": []}
    node_cfg = node_config(client, cfg)
    splits = load_splits(node_cfg)
    warnings = [f"{split}: {reason}" for split, reasons in splits.bad_rows.items() for reason in reasons]
    present = {label for s in shard.train.samples for label in np.atleast_1d(s.label).tolist()}
    out = {k: v for k, v in info.items() if k != "client-id"}
    return {
        "ok": True,
        "problems": [],
        "warnings": _capped(warnings),
        **out,
        "num-classes": splits.num_classes,
        "num-classes-present": len(present),
        "summary": shard.summary(),
    }


def _problem(exc: BaseException) -> str:
    from .failures import one_line

    return one_line(str(exc)) if isinstance(exc, (ConfigError, DataError)) else one_line(f"{type(exc).__name__}: {exc}")


def _other_bad_rows(cfg: RunConfig, first: str) -> list[str]:
    """The bad rows after the one that stopped a strict load: the folder read again, skipping bad rows."""
    if dataset_spec(cfg.dataset).generated:
        return []
    from .data.loaders import load_dataset

    quiet = logging.getLogger("fedprime_core.data.loaders")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # this pass only collects reasons; its "skipped N rows" would mislead
    try:
        splits = load_dataset(
            cfg.dataset,
            cfg.data_dir,
            layout=cfg.data_layout,
            num_classes=cfg.num_classes,
            skip_bad_rows=True,
            verify_images=True,
            classes=class_list(cfg) or None,
            mmimdb_protocol=cfg.mmimdb_protocol,
            required=(),
        )
    except (DataError, OSError, ValueError):
        return []  # not a row's fault (the folder, the class list): the first problem says it all
    finally:
        quiet.setLevel(level)
    reasons = [reason for rows in splits.bad_rows.values() for reason in rows if reason != first]
    return _capped(reasons, MAX_PROBLEMS - 1)


def _capped(lines: list[str], limit: int = MAX_PROBLEMS) -> list[str]:
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... and {len(lines) - limit} more"]


# ---------------------------------------------------------------------------------------
# Model, training, evaluation
# ---------------------------------------------------------------------------------------
def build_model(cfg: RunConfig) -> PromptedModel:
    """A fresh prompted model for the run (the initial global trainable state comes from it)."""
    model = prompted_model(
        process_backbone(cfg).backbone, cfg, label_space(cfg).num_classes, seed=draw_seed(cfg.seed, Draw.MODEL)
    )
    return model.to(resolve_device(cfg.device))


def process_model(cfg: RunConfig) -> PromptedModel:
    """The one model object this process reuses across rounds (its state is reloaded each call)."""
    return _cached(cache_key(cfg, "model"), lambda: build_model(cfg))


def initial_state(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global trainable state before round 1 (deterministic for the seed)."""
    return trainable_state(build_model(cfg))


def run_loader(cfg: RunConfig, data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """:func:`~fedprime_core.data.processing.make_loader` with the run's ``num-workers`` and ``text-padding``."""
    return make_loader(
        data, batch_size, shuffle=shuffle, seed=seed, num_workers=cfg.num_workers, trim_text=cfg.text_padding == "batch"
    )


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
    cfg = node_config(node, cfg)
    shard = client_shard(cfg, node)
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    loader = run_loader(
        cfg,
        shard.train,
        cfg.batch_size,
        shuffle=True,
        seed=draw_seed(cfg.seed, Draw.SHUFFLE, node.seed_key, server_round),
    )
    settings = train_settings(cfg)
    result = train_local(model, loader, settings, multilabel=shard.train.multilabel, device=device)
    return trainable_state(model), result, shard


def client_evaluate(
    cfg: RunConfig, state: Mapping[str, np.ndarray], client: ClientNode | int, num_partitions: int | None = None
) -> dict[str, float]:
    """Evaluate ``state`` (what the server sent this client: its own inter pool where the method keeps one)
    on the client's local validation split and on its own test set.

    Returns:
        ``{"loss", "accuracy", "macro_f1", "micro_f1", "num-examples"}`` of the validation split,
        and the same of the client's test set prefixed ``test-`` (:data:`CLIENT_TEST_PREFIX`;
        absent when it has none: :attr:`~fedprime_core.data.shards.ClientShard.test`).
    """
    node = _as_node(client, num_partitions)
    cfg = node_config(node, cfg)
    shard = client_shard(cfg, node)
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    loader = run_loader(cfg, shard.val, cfg.eval_batch_size, shuffle=False)
    out = evaluate(model, loader, shard.val.multilabel, device)
    if shard.test is not None:
        loader = run_loader(cfg, shard.test, cfg.eval_batch_size, shuffle=False)
        test = evaluate(model, loader, shard.test.multilabel, device)
        out.update({CLIENT_TEST_PREFIX + key: value for key, value in test.items()})
    return out


def server_eval_sets(cfg: RunConfig) -> dict[str, MultimodalDataset]:
    """The server's held-out sets (:func:`fedprime_core.data.shards.server_eval_sets`), cached per process."""
    return _cached(
        cache_key(cfg, "server-eval"),
        lambda: shards.server_eval_sets(shard_settings(cfg), load_splits(cfg), process_backbone(cfg).processor),
    )


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
        loader = run_loader(cfg, data, cfg.eval_batch_size, shuffle=False)
        out[name] = evaluate(model, _counted(loader, progress, name), multilabel, device)
    progress.close()
    return out


def _counted(batches: Iterable[Mapping[str, torch.Tensor]], progress: Progress, name: str) -> Iterator:
    """``batches`` unchanged, counting their samples into ``progress`` (current part ``name``)."""
    for batch in batches:
        yield batch
        progress.update(len(batch["labels"]), status=name)
