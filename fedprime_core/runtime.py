"""Everything a client or server process needs for a run, loaded once per process.

The Flower apps are thin adapters over this module: a ClientApp asks for its
:class:`ClientShard` and calls :func:`client_train` / :func:`client_evaluate`; the
ServerApp builds the initial state and evaluates the global model with
:func:`server_evaluate`. Loaded backbones, datasets, shards and models are cached per
process (keyed by the configuration values that determine them), so a simulation actor or
a long-lived process reads the backbone once, not every round.

Randomness: every draw (partitions, each client's missing mixture and patterns, test
patterns, initial prompts) comes from ``numpy.random.SeedSequence([seed, purpose, ...])``,
so it is a pure function of the run seed and the same in every process that computes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .backbones.base import Backbone
from .config import RunConfig
from .data.missing import (
    TEST_SETTINGS,
    client_mixtures,
    evaluation_mixture,
    load_missing_table,
    pattern_counts,
    sample_patterns,
    setting_mixture,
)
from .data.partition import partition
from .data.processing import MultimodalDataset, MultimodalProcessor, make_loader
from .data.records import DatasetSplits, Sample, primary_labels
from .methods import method_spec
from .model import PromptedModel, PromptSettings, load_trainable_state, trainable_state
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
        if features:
            from .features import feature_shape

            shape = feature_shape(load_splits(cfg).train)
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
            "loaded backbone %s (%s) from %s, fingerprint %s", cfg.model, cfg.backbone, parts.source, fingerprint
        )
        return LoadedBackbone(backbone, processor, fingerprint)

    return _cached(key, build)


def load_splits(cfg: RunConfig) -> DatasetSplits:
    """The dataset's train/dev/test splits, cached per process."""
    from .backbones import needs_image_features

    # The embedded set computes its generated image features only for a feature backbone.
    features = cfg.dataset == "embedded" and needs_image_features(cfg.backbone)
    key = ("splits", cfg.dataset, cfg.data_dir, cfg.data_layout, cfg.num_classes, cfg.skip_bad_rows, cfg.seed, features)

    def build() -> DatasetSplits:
        if cfg.dataset == "embedded":
            from .data.embedded import make_embedded_dataset

            return make_embedded_dataset(cfg.seed, image_features=features)
        from .data.loaders import load_dataset

        # Decoding every image of a full benchmark at each process start is too slow;
        # missing files are always caught here, undecodable ones are verified up front only
        # when bad rows are to be skipped (otherwise they fail with a DataError naming the
        # file and row when first read).
        return load_dataset(
            cfg.dataset,
            cfg.data_dir,
            layout=cfg.data_layout,
            num_classes=cfg.num_classes,
            skip_bad_rows=cfg.skip_bad_rows,
            verify_images=cfg.skip_bad_rows,
        )

    return _cached(key, build)


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
@dataclasses.dataclass
class ClientShard:
    """One client's local data, with its own missing-modality mixture applied.

    Attributes:
        partition_id: the client's partition (``-1`` for the centralized owner).
        train, val: local training and validation sets.
        mixture: ``(3,)`` the client's pattern mixture (complete, text-missing, image-missing).
        counts: realised pattern counts of the training set.
    """

    partition_id: int
    train: MultimodalDataset
    val: MultimodalDataset
    mixture: np.ndarray
    counts: dict[str, int]

    def describe(self) -> dict[str, Any]:
        return {
            "partition-id": self.partition_id,
            "num-train": len(self.train),
            "num-val": len(self.val),
            "mixture": [round(float(x), 4) for x in self.mixture],
            **self.counts,
        }


def client_mixture_table(cfg: RunConfig, num_partitions: int) -> np.ndarray:
    """Every client's missing-pattern mixture, ``(num_partitions, 3)``."""
    if cfg.missing_table:
        return load_missing_table(cfg.missing_table, num_partitions)
    return client_mixtures(
        num_partitions, cfg.missing_setting, cfg.eta, cfg.missing_alpha, _rng(cfg.seed, _SEED_MIXTURE)
    )


def _dataset(
    cfg: RunConfig, samples: list[Sample], patterns: np.ndarray, loaded: LoadedBackbone, splits: DatasetSplits
) -> MultimodalDataset:
    in_memory = cfg.dataset == "embedded"
    return MultimodalDataset(
        samples, patterns, loaded.processor, splits.num_classes, splits.multilabel, cache_images=in_memory
    )


def client_shard(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientShard:
    """The shard of client ``partition_id`` out of ``num_partitions`` (cached per process).

    ``centralized-p`` ignores the partition: its single owner holds all training data
    with the global missing mixture.
    """
    spec = method_spec(cfg.method)
    if not spec.centralized and not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    key = (
        "shard",
        cfg.dataset,
        cfg.data_dir,
        cfg.num_classes,
        cfg.seed,
        cfg.method == "centralized-p",
        partition_id,
        num_partitions,
        cfg.label_alpha,
        cfg.min_partition_size,
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

    def build() -> ClientShard:
        splits = load_splits(cfg)
        loaded = load_backbone(cfg)
        train, _ = _train_and_server_val(cfg, splits)
        if spec.centralized:
            indices = np.arange(len(train))
            mixture = setting_mixture(cfg.missing_setting, cfg.eta)
            pid = -1
        else:
            parts = partition(primary_labels(train), num_partitions, cfg.label_alpha, cfg.min_partition_size, cfg.seed)
            indices = parts[partition_id]
            mixture = client_mixture_table(cfg, num_partitions)[partition_id]
            pid = partition_id
        order = _rng(cfg.seed, _SEED_SPLIT, 2, pid + 1).permutation(indices)
        n_val = int(round(len(order) * cfg.val_fraction)) if len(order) > 1 else 0
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        train_patterns = sample_patterns(len(train_idx), mixture, _rng(cfg.seed, _SEED_PATTERNS, pid + 1, 0))
        val_patterns = sample_patterns(len(val_idx), mixture, _rng(cfg.seed, _SEED_PATTERNS, pid + 1, 1))
        shard = ClientShard(
            partition_id=pid,
            train=_dataset(cfg, [train[i] for i in train_idx], train_patterns, loaded, splits),
            val=_dataset(cfg, [train[i] for i in val_idx], val_patterns, loaded, splits),
            mixture=mixture,
            counts=pattern_counts(train_patterns),
        )
        LOGGER.info("client shard %s", shard.describe())
        return shard

    return _cached(key, build)


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
    splits = load_splits(cfg)
    seed = int(np.random.SeedSequence([cfg.seed, _SEED_MODEL]).generate_state(1)[0])
    model = PromptedModel(
        loaded.backbone,
        method_spec(cfg.method),
        splits.num_classes,
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
        prompt_settings(cfg),
        cfg.exchange_pooler,
        cfg.device,
    )
    return _cached(key, lambda: build_model(cfg))


def initial_state(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global trainable state before round 1 (deterministic for the seed)."""
    return trainable_state(build_model(cfg))


def client_train(
    cfg: RunConfig, state: Mapping[str, np.ndarray], partition_id: int, num_partitions: int, server_round: int
) -> tuple[dict[str, np.ndarray], TrainResult, ClientShard]:
    """Load the global ``state``, train locally for one round, return the new state."""
    shard = client_shard(cfg, partition_id, num_partitions)
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    loader = make_loader(
        shard.train,
        cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        seed=int(
            np.random.SeedSequence([cfg.seed, _SEED_SHUFFLE, partition_id + 1, server_round]).generate_state(1)[0]
        ),
    )
    splits = load_splits(cfg)
    result = train_local(model, loader, train_settings(cfg), multilabel=splits.multilabel, device=device)
    return trainable_state(model), result, shard


def client_evaluate(
    cfg: RunConfig, state: Mapping[str, np.ndarray], partition_id: int, num_partitions: int
) -> dict[str, float]:
    """Evaluate the global ``state`` on the client's local validation split."""
    shard = client_shard(cfg, partition_id, num_partitions)
    model = process_model(cfg)
    load_trainable_state(model, state)
    loader = make_loader(shard.val, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    return evaluate(model, loader, load_splits(cfg).multilabel, resolve_device(cfg.device))


def server_eval_sets(cfg: RunConfig) -> dict[str, MultimodalDataset]:
    """The server's held-out sets: ``val`` (same-as-train mixture) and the five test settings."""
    key = (
        "server-eval",
        cfg.dataset,
        cfg.data_dir,
        cfg.num_classes,
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
        _, dev = _train_and_server_val(cfg, splits)
        dev = _cap(dev, cfg.max_test_samples, cfg.seed, 3)
        test = _cap(list(splits.test), cfg.max_test_samples, cfg.seed, 4)
        sets = {
            "val": _dataset(
                cfg,
                dev,
                sample_patterns(
                    len(dev), setting_mixture(cfg.missing_setting, cfg.eta), _rng(cfg.seed, _SEED_TEST, 99)
                ),
                loaded,
                splits,
            )
        }
        for i, setting in enumerate(TEST_SETTINGS):
            mixture = evaluation_mixture(setting, cfg.missing_setting, cfg.eta)
            sets[setting] = _dataset(
                cfg, test, sample_patterns(len(test), mixture, _rng(cfg.seed, _SEED_TEST, i)), loaded, splits
            )
        return sets

    return _cached(key, build)


def server_evaluate(cfg: RunConfig, state: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Metrics of the global ``state`` on the server's validation split and five test settings."""
    model = process_model(cfg)
    load_trainable_state(model, state)
    device = resolve_device(cfg.device)
    multilabel = load_splits(cfg).multilabel
    return {
        name: evaluate(
            model,
            make_loader(data, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers),
            multilabel,
            device,
        )
        for name, data in server_eval_sets(cfg).items()
    }
