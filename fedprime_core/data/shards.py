"""From a dataset's splits to each client's shard and the server's held-out sets.

A client's data comes one of two ways:

* **partitioned** (simulation; a deployment that shares one dataset): the node is
  ``partition-id`` of ``num-partitions`` and carves its shard out of the run config's
  ``data-dir`` (label partition, its own missing mixture, a local validation split):
  :func:`partition_shard`;
* **site-local** (a real site): the node config names the site's own ``data-dir``; the
  client trains on all of its train split and validates on its dev split (or a
  ``val-fraction`` of train), nothing partitioned: :func:`site_shard`. The server then keeps
  only its own held-out folder (the run config's ``data-dir``), or none.

Each client also gets a **test set of its own** (``client-test-samples`` rows at most), on
which it evaluates the state it actually uses (client-side evaluation): a partitioned client
draws it from the dataset's test split with the label proportions of its training partition
(:func:`label_matched_rows`) and applies its own missing mixture; a site takes its own test
split (``test.jsonl``), with its mixture applied to the complete rows as on its train split.
The test split is never used to select a model (the server selects on its validation split).

In both, rows that miss a modality in the data keep it, and a simulated mixture applies
on top only to complete rows (:func:`fedprime_core.data.missing.apply_missing`).

Randomness: every draw comes from ``numpy.random.SeedSequence([seed, purpose, ...])``
(:func:`rng`) with a named purpose (:class:`Draw` and the draws under it), so it is a pure
function of the run seed and the same in every process that computes it. The numbers are
part of every published result: a new draw takes a new number, an old one never changes.

Everything here is pure: the caller (:mod:`fedprime_core.runtime`) reads the splits and
the backbone's processor once per process and caches what these functions build.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..identity import ClientNode
from .datasets import dataset
from .missing import (
    TEST_SETTINGS,
    apply_missing,
    client_mixtures,
    evaluation_mixture,
    load_missing_table,
    missing_counts,
    missing_table_entry,
    setting_mixture,
)
from .partition import partition
from .processing import MultimodalDataset, MultimodalProcessor
from .records import PATTERN_NAMES, DataError, DatasetSplits, Sample, primary_labels

LOGGER = logging.getLogger(__name__)


class Draw(enum.IntEnum):
    """What a random draw is for: the purpose that follows the run seed in its ``SeedSequence``."""

    SPLIT = 0  #: which rows go where (then a :class:`SplitDraw`)
    PARTITION = 1  #: reserved (:func:`fedprime_core.data.partition.partition` seeds from the run seed)
    MIXTURE = 2  #: each client's missing-pattern mixture (then :class:`MixtureDraw` for a site)
    PATTERNS = 3  #: which rows of a client miss which modality (then the client, a :class:`PatternDraw`)
    TEST = 4  #: the server's held-out patterns (then the test setting's index, or :data:`VALIDATION_PATTERNS`)
    MODEL = 5  #: the initial prompts, keys and head
    SHUFFLE = 6  #: a client's batch order (then the client and the round)


class SplitDraw(enum.IntEnum):
    """Which rows a :attr:`Draw.SPLIT` draw picks (the server's validation share of train has none)."""

    TRAIN_CAP = 1  #: the ``max-train-samples`` rows kept before partitioning
    CLIENT_VALIDATION = 2  #: a client's validation rows (then the client)
    SERVER_VALIDATION_CAP = 3  #: the ``max-test-samples`` rows of the server's validation set
    TEST_CAP = 4  #: the ``max-test-samples`` rows of the test set
    TEST_AS_VALIDATION = 5  #: a held-out folder without dev or train: the test rows that validate
    CLIENT_TEST = 6  #: a partitioned client's own test rows (then the client)
    SITE_TRAIN_CAP = 10  #: the ``max-train-samples`` rows a site keeps
    SITE_TEST_CAP = 11  #: the ``client-test-samples`` rows of a site's own test split (then the client)


class MixtureDraw(enum.IntEnum):
    """A :attr:`Draw.MIXTURE` draw of one site (the partitioned clients' table has none)."""

    SITE = 1


class PatternDraw(enum.IntEnum):
    """Which of a client's sets a :attr:`Draw.PATTERNS` draw is for."""

    TRAIN = 0
    VALIDATION = 1
    TEST = 2


#: The :attr:`Draw.TEST` purpose of the server's validation set (test settings use their index).
VALIDATION_PATTERNS = 99


def rng(seed: int, *purpose: int) -> np.random.Generator:
    """The generator of draw ``purpose`` (a :class:`Draw`, then what it names) under the run seed."""
    return np.random.default_rng(np.random.SeedSequence([seed, *map(int, purpose)]))


def draw_seed(seed: int, *purpose: int) -> int:
    """One 32-bit seed of draw ``purpose`` (for torch generators)."""
    return int(np.random.SeedSequence([seed, *map(int, purpose)]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    """What decides the clients' shards and the server's held-out sets: the run config keys of the same
    names (the run layer reads them, :func:`fedprime_core.run_settings.shard_settings`)."""

    dataset: str
    data_dir: str
    seed: int
    val_fraction: float
    max_train_samples: int
    label_alpha: float
    min_partition_size: int
    client_size_sigma: float
    missing_setting: str
    eta: float
    missing_alpha: float
    missing_table: str
    client_test_samples: int
    max_test_samples: int


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


@dataclasses.dataclass
class ClientShard:
    """One client's local data, with its own missing-modality mixture applied.

    Attributes:
        partition_id: the client's partition (``-1`` for the centralized owner and for a
            site without one).
        train, val: local training and validation sets.
        test: the client's own test set (module docstring), ``None`` when it has none
            (``client-test-samples = 0``, or a site without a test split).
        mixture: ``(3,)`` the simulated pattern mixture (complete, text-missing,
            image-missing) applied to the complete rows (a site's counted mixture:
            :attr:`realised_mixture`).
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
    test: MultimodalDataset | None = None

    @property
    def num_test(self) -> int:
        return 0 if self.test is None else len(self.test)

    @property
    def realised_mixture(self) -> np.ndarray:
        """``(3,)`` shares of complete, text-missing and image-missing training rows, counted (real and simulated)."""
        counts = np.array([self.counts.get(name, 0) for name in PATTERN_NAMES], dtype=np.float64)
        total = counts.sum()
        return counts / total if total else counts

    def summary(self) -> str:
        """One readable line: sizes, the missing mixture and the realised pattern counts (real and simulated).

        A site's line gives the mixture its rows really have (counted, as training sees them);
        a partition's the simulated mixture it was drawn with.
        """
        if self.site_local:
            shares = self.realised_mixture
            counts = ", ".join(
                f"{name} {self.counts.get(name, 0)} ({100 * share:.0f}%)" for name, share in zip(PATTERN_NAMES, shares)
            )
            simulated = sum(self.counts.get(f"simulated-{name}", 0) for name in PATTERN_NAMES[1:])
            line = f"{len(self.train)} train / {len(self.val)} validation rows; training rows {counts}"
            if simulated:
                line += f" ({simulated} of the missing ones simulated)"
            if self.skipped_empty:
                line += f"; {self.skipped_empty} rows with neither text nor image skipped"
            return line
        mixture = " / ".join(f"{name} {share:.2f}" for name, share in zip(self.counts, self.mixture))
        counts = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        sizes = f"{len(self.train)} train / {len(self.val)} validation / {self.num_test} test samples"
        line = f"{sizes}; missing mixture {mixture}; train patterns {counts}"
        if self.site_local and self.skipped_empty:
            line += f"; {self.skipped_empty} rows with neither text nor image skipped"
        return line

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client-id": self.client_id or str(self.partition_id)}
        if self.partition_id >= 0:  # -1: the centralized owner, or a site without a partition
            out["partition-id"] = self.partition_id
        out.update(
            {
                "data": "site" if self.site_local else "partition",
                "num-train": len(self.train),
                "num-val": len(self.val),
                "num-test": self.num_test,
                "mixture": [round(float(x), 4) for x in self.mixture],
                **self.counts,
            }
        )
        if self.site_local:
            # A site's rows miss what they miss: its mixture is what was counted, the simulated one apart.
            out["mixture"] = [round(float(x), 4) for x in self.realised_mixture]
            out["simulated-mixture"] = [round(float(x), 4) for x in self.mixture]
            out["skipped-no-modality"] = self.skipped_empty
        return out


def train_and_server_val(cfg: ShardSettings, splits: DatasetSplits) -> tuple[list[Sample], list[Sample]]:
    """Training pool (capped by max-train-samples) and the server's validation split.

    The dataset's dev split is the server's validation split; without one, a stratified
    ``val-fraction`` of train is held out for it (never seen by clients).
    """
    train = list(splits.train)
    dev = list(splits.dev)
    if not dev:
        order = rng(cfg.seed, Draw.SPLIT).permutation(len(train))
        cut = max(1, int(round(len(train) * max(cfg.val_fraction, 0.05))))
        dev = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    return _cap(train, cfg.max_train_samples, cfg.seed, SplitDraw.TRAIN_CAP), dev


def _cap(samples: list[Sample], limit: int, seed: int, draw: SplitDraw, *purpose: int) -> list[Sample]:
    """At most ``limit`` of ``samples`` (0: all), drawn by ``draw`` (then ``purpose``), in their order."""
    if not limit or len(samples) <= limit:
        return samples
    keep = rng(seed, Draw.SPLIT, draw, *purpose).permutation(len(samples))[:limit]
    return [samples[i] for i in sorted(keep)]


def _split_validation(
    samples: Sequence[Sample], indices: np.ndarray, fraction: float, generator: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """``(validation, train)``: a random ``fraction`` of the rows ``indices`` of ``samples`` and the rest, each
    in the order of ``samples``."""
    order = generator.permutation(indices)
    n_val = int(round(len(order) * fraction)) if len(order) > 1 else 0
    return [samples[i] for i in np.sort(order[:n_val])], [samples[i] for i in np.sort(order[n_val:])]


def partition_train(cfg: ShardSettings, train: Sequence[Sample], num_partitions: int) -> list[np.ndarray]:
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


def client_mixture_table(cfg: ShardSettings, num_partitions: int) -> np.ndarray:
    """Every client's missing-pattern mixture, ``(num_partitions, 3)``."""
    if cfg.missing_table:
        return load_missing_table(cfg.missing_table, num_partitions)
    return client_mixtures(num_partitions, cfg.missing_setting, cfg.eta, cfg.missing_alpha, rng(cfg.seed, Draw.MIXTURE))


def site_mixture(cfg: ShardSettings, client: ClientNode) -> np.ndarray:
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
    generator = rng(cfg.seed, Draw.MIXTURE, MixtureDraw.SITE, client.seed_key)
    return client_mixtures(1, cfg.missing_setting, cfg.eta, cfg.missing_alpha, generator)[0]


def _client_sets(
    cfg: ShardSettings,
    train: list[Sample],
    val: list[Sample],
    mixture: np.ndarray,
    key: int,
    processor: MultimodalProcessor,
    splits: DatasetSplits,
) -> tuple[MultimodalDataset, MultimodalDataset, dict[str, int]]:
    """A client's train and validation datasets with ``mixture`` applied (drawn under client ``key``), and the
    realised training pattern counts."""
    train_patterns, natural = apply_missing(train, mixture, rng(cfg.seed, Draw.PATTERNS, key, PatternDraw.TRAIN))
    val_patterns, _ = apply_missing(val, mixture, rng(cfg.seed, Draw.PATTERNS, key, PatternDraw.VALIDATION))
    return (
        _dataset(cfg, train, train_patterns, processor, splits),
        _dataset(cfg, val, val_patterns, processor, splits),
        missing_counts(train_patterns, natural),
    )


def label_matched_rows(
    pool_labels: np.ndarray, proportions: np.ndarray, size: int, generator: np.random.Generator
) -> np.ndarray:
    """Rows of a pool whose label counts follow ``proportions``: at most ``size`` of them, drawn without replacement.

    Each label gets its largest-remainder share of the size (ties: the lower label). When the
    pool lacks the rows of some label for that, the size shrinks until every share fits, so
    the proportions hold; the rows are never drawn twice.

    Args:
        pool_labels: ``(N,)`` int label of every row of the pool (``-1``: no label, never drawn).
        proportions: ``(C,)`` non-negative label weights (need not sum to 1).
        size: how many rows at most.
        generator: the draw's randomness.

    Returns:
        Sorted row indices into the pool, ``(M,)`` with ``M <= size``.
    """
    pool_labels = np.asarray(pool_labels)
    weights = np.asarray(proportions, dtype=np.float64)
    if weights.ndim != 1 or np.any(weights < 0) or not np.isfinite(weights).all():
        raise ValueError(f"proportions must be a vector of non-negative weights, got {proportions!r}")
    if size <= 0 or weights.sum() <= 0:
        return np.zeros(0, dtype=np.int64)
    share = weights / weights.sum()
    available = np.array([np.sum(pool_labels == c) for c in range(share.size)])
    wanted = share > 0
    fits = available[wanted] / share[wanted]
    size = int(min(size, np.floor(fits.min() + 1e-9))) if fits.size else 0

    def quotas(total: int) -> np.ndarray:
        exact = share * total
        counts = np.floor(exact).astype(np.int64)
        order = np.lexsort((np.arange(share.size), -(exact - counts)))
        counts[order[: total - int(counts.sum())]] += 1
        return counts

    counts = np.minimum(quotas(size), available)
    chosen = [
        generator.choice(np.flatnonzero(pool_labels == c), size=int(k), replace=False)
        for c, k in enumerate(counts)
        if k
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _test_set(
    cfg: ShardSettings,
    samples: list[Sample],
    mixture: np.ndarray,
    key: int,
    processor: MultimodalProcessor,
    splits: DatasetSplits,
) -> MultimodalDataset | None:
    """A client's test set: ``samples`` with its ``mixture`` applied (drawn under client ``key``)."""
    if not samples:
        return None
    patterns, _ = apply_missing(samples, mixture, rng(cfg.seed, Draw.PATTERNS, key, PatternDraw.TEST))
    return _dataset(cfg, samples, patterns, processor, splits)


def client_test_rows(
    cfg: ShardSettings, splits: DatasetSplits, partition_labels: np.ndarray, key: int, who: str = ""
) -> list[Sample]:
    """A partitioned client's own test rows: ``client-test-samples`` rows of the test split at most, with the
    label proportions of the client's training partition (``partition_labels``), drawn under client ``key``
    (``who`` names it in the log)."""
    if not cfg.client_test_samples or not splits.test:
        return []
    test = list(splits.test)
    proportions = np.bincount(partition_labels[partition_labels >= 0], minlength=splits.num_classes)
    rows = label_matched_rows(
        primary_labels(test),
        proportions,
        cfg.client_test_samples,
        rng(cfg.seed, Draw.SPLIT, SplitDraw.CLIENT_TEST, key),
    )
    if len(rows) < cfg.client_test_samples:
        LOGGER.info(
            "client %s: %d test rows with its label proportions (client-test-samples=%d; the test split has "
            "no more of its classes)",
            who or key,
            len(rows),
            cfg.client_test_samples,
        )
    return [test[i] for i in rows]


def partition_shard(
    cfg: ShardSettings,
    splits: DatasetSplits,
    processor: MultimodalProcessor,
    partition_id: int,
    num_partitions: int,
    client_id: str,
    centralized: bool = False,
) -> ClientShard:
    """Shard ``partition_id`` of ``num_partitions`` of the run's training pool.

    ``centralized`` (``centralized-p``) ignores the partition: the single owner holds all
    training data with the global missing mixture.
    """
    train, _ = train_and_server_val(cfg, splits)
    if centralized:
        indices = np.arange(len(train))
        mixture = setting_mixture(cfg.missing_setting, cfg.eta)
        pid = -1
    else:
        indices = partition_train(cfg, train, num_partitions)[partition_id]
        mixture = client_mixture_table(cfg, num_partitions)[partition_id]
        pid = partition_id
    draw = rng(cfg.seed, Draw.SPLIT, SplitDraw.CLIENT_VALIDATION, pid + 1)
    val, local_train = _split_validation(train, indices, cfg.val_fraction, draw)
    train_set, val_set, counts = _client_sets(cfg, local_train, val, mixture, pid + 1, processor, splits)
    labels = primary_labels([train[i] for i in indices])
    test_rows = client_test_rows(cfg, splits, labels, pid + 1, "centralized" if centralized else client_id)
    return ClientShard(
        partition_id=pid,
        train=train_set,
        val=val_set,
        mixture=mixture,
        counts=counts,
        client_id="centralized" if centralized else client_id,
        test=_test_set(cfg, test_rows, mixture, pid + 1, processor, splits),
    )


def site_shard(
    cfg: ShardSettings, splits: DatasetSplits, processor: MultimodalProcessor, client: ClientNode
) -> ClientShard:
    """A site's own data (``cfg.data_dir``, the node's folder), nothing partitioned.

    Train: the whole train split (capped by ``max-train-samples`` when set). Validation: the
    site's dev split, or a ``val-fraction`` of train when it has none. Missing modalities:
    the rows' own, plus :func:`site_mixture` simulated on the complete rows.

    Raises:
        DataError: the folder has no training rows.
    """
    if not splits.train:
        raise DataError(
            f"site {client.client_id}: {cfg.data_dir!r} holds no training rows; a site needs its train split "
            "(train.jsonl, or <dataset>_train.arrow) with at least one usable row"
        )
    train = _cap(list(splits.train), cfg.max_train_samples, cfg.seed, SplitDraw.SITE_TRAIN_CAP)
    if splits.dev:
        val = list(splits.dev)
    else:
        draw = rng(cfg.seed, Draw.SPLIT, SplitDraw.CLIENT_VALIDATION, client.seed_key)
        val, train = _split_validation(train, np.arange(len(train)), cfg.val_fraction, draw)
    mixture = site_mixture(cfg, client)
    train_set, val_set, counts = _client_sets(cfg, train, val, mixture, client.seed_key, processor, splits)
    test = []
    if cfg.client_test_samples:
        test = _cap(list(splits.test), cfg.client_test_samples, cfg.seed, SplitDraw.SITE_TEST_CAP, client.seed_key)
        if not test:
            LOGGER.info(
                "site %s: no test split in %s; client-side evaluation on validation only",
                client.client_id,
                cfg.data_dir,
            )
    return ClientShard(
        partition_id=-1 if client.partition_id is None else client.partition_id,
        train=train_set,
        val=val_set,
        mixture=mixture,
        counts=counts,
        client_id=client.client_id,
        site_local=True,
        skipped_empty=int(splits.skipped_empty.get("train", 0)),
        test=_test_set(cfg, test, mixture, client.seed_key, processor, splits),
    )


def _server_heldout(cfg: ShardSettings, splits: DatasetSplits) -> tuple[list[Sample], list[Sample]]:
    """The server's validation and test samples (uncapped).

    Validation: the dev split; without one, the held-out part of train
    (:func:`train_and_server_val`); in a held-out folder without train either, a
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
        return train_and_server_val(cfg, splits)[1], test
    order = rng(cfg.seed, Draw.SPLIT, SplitDraw.TEST_AS_VALIDATION).permutation(len(test))
    cut = max(1, int(round(len(test) * max(cfg.val_fraction, 0.05)))) if len(test) > 1 else 0
    LOGGER.info("server: no dev or train split in %s; %d test samples become the validation split", cfg.data_dir, cut)
    return [test[i] for i in np.sort(order[:cut])], [test[i] for i in np.sort(order[cut:])]


def server_eval_sets(
    cfg: ShardSettings, splits: DatasetSplits, processor: MultimodalProcessor
) -> dict[str, MultimodalDataset]:
    """The server's held-out sets: ``val`` (same-as-train mixture) and the five test settings.

    Rows that miss a modality in the data keep it in every setting; each setting's mixture
    applies to the complete rows.
    """
    dev, test = _server_heldout(cfg, splits)
    dev = _cap(dev, cfg.max_test_samples, cfg.seed, SplitDraw.SERVER_VALIDATION_CAP)
    test = _cap(test, cfg.max_test_samples, cfg.seed, SplitDraw.TEST_CAP)
    val_mixture = setting_mixture(cfg.missing_setting, cfg.eta)
    val_patterns, _ = apply_missing(dev, val_mixture, rng(cfg.seed, Draw.TEST, VALIDATION_PATTERNS))
    sets = {"val": _dataset(cfg, dev, val_patterns, processor, splits)}
    for i, setting in enumerate(TEST_SETTINGS):
        mixture = evaluation_mixture(setting, cfg.missing_setting, cfg.eta)
        patterns, _ = apply_missing(test, mixture, rng(cfg.seed, Draw.TEST, i))
        sets[setting] = _dataset(cfg, test, patterns, processor, splits)
    return sets


def _dataset(
    cfg: ShardSettings,
    samples: list[Sample],
    patterns: np.ndarray,
    processor: MultimodalProcessor,
    splits: DatasetSplits,
) -> MultimodalDataset:
    in_memory = dataset(cfg.dataset).generated
    return MultimodalDataset(
        samples, patterns, processor, splits.num_classes, splits.multilabel, cache_images=in_memory
    )
