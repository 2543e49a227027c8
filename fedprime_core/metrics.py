"""Classification metrics (accuracy, macro-/micro-F1), the adjusted Rand index, and information measures
of how prompt clusters specialise on missing patterns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def f1_scores(true_hot: np.ndarray, pred_hot: np.ndarray) -> tuple[float, float]:
    """Macro- and micro-F1 from multi-hot truth and predictions ``(N, C)``.

    A class with no true and no predicted positive is left out of the macro average.
    """
    true_hot = np.asarray(true_hot, dtype=bool)
    pred_hot = np.asarray(pred_hot, dtype=bool)
    tp = np.sum(true_hot & pred_hot, axis=0).astype(np.float64)
    fp = np.sum(~true_hot & pred_hot, axis=0).astype(np.float64)
    fn = np.sum(true_hot & ~pred_hot, axis=0).astype(np.float64)
    present = (tp + fp + fn) > 0
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    macro = float(per_class[present].mean()) if present.any() else 0.0
    total = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = float(2 * tp.sum() / total) if total > 0 else 0.0
    return macro, micro


def classification_metrics(logits: np.ndarray, labels: np.ndarray, multilabel: bool) -> dict[str, float]:
    """Accuracy, macro-F1 and micro-F1.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class indices, or ``(N, C)`` multi-hot when ``multilabel``.
        multilabel: sigmoid > 0.5 decides each class; accuracy is the exact-match ratio.

    Returns:
        ``{"accuracy", "macro_f1", "micro_f1"}`` in ``[0, 1]``.
    """
    logits = np.asarray(logits)
    num_classes = logits.shape[1]
    if multilabel:
        true_hot = np.asarray(labels) > 0.5
        pred_hot = logits > 0.0
        accuracy = float(np.mean(np.all(true_hot == pred_hot, axis=1))) if len(logits) else 0.0
    else:
        labels = np.asarray(labels, dtype=np.int64)
        pred = logits.argmax(axis=1)
        accuracy = float(np.mean(pred == labels)) if len(logits) else 0.0
        true_hot = np.eye(num_classes, dtype=bool)[labels]
        pred_hot = np.eye(num_classes, dtype=bool)[pred]
    macro, micro = f1_scores(true_hot, pred_hot)
    return {"accuracy": accuracy, "macro_f1": macro, "micro_f1": micro}


def adjusted_rand_index(labels_a: Sequence[int], labels_b: Sequence[int]) -> float:
    """Adjusted Rand index of two clusterings of the same items (1 = identical partitions)."""
    a = np.unique(np.asarray(labels_a), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_b), return_inverse=True)[1]
    if a.size != b.size:
        raise ValueError("both clusterings must label the same items")
    n = a.size
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x: np.ndarray) -> float:
        return float(np.sum(x * (x - 1) / 2))

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    total = n * (n - 1) / 2
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def mutual_information_bits(joint: np.ndarray) -> float:
    """Mutual information (bits) of the two variables whose joint counts are ``joint`` ``(A, B)``.

    ``I(X; Y) = sum_xy p(x, y) log2(p(x, y) / (p(x) p(y)))``, with ``0 log 0 = 0``; 0 when
    there are no counts. At most ``min(log2 A, log2 B)``.
    """
    counts = np.asarray(joint, dtype=np.float64)
    if counts.ndim != 2 or np.any(counts < 0):
        raise ValueError(f"joint counts must be a non-negative (A, B) array, got shape {counts.shape}")
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(max(0.0, np.sum(p[nz] * np.log2(p[nz] / outer[nz]))))


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of the distribution proportional to ``counts`` ``(A,)``."""
    p = np.asarray(counts, dtype=np.float64).ravel()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-np.sum(p * np.log2(p)))


def specialised_share(joint: np.ndarray, threshold: float = 0.8) -> float:
    """Share of the used columns of ``joint`` ``(A, B)`` whose largest row accounts for more than ``threshold`` of it.

    With rows = missing patterns and columns = prompt clusters: the fraction of clusters
    (among those retrieved at all) that one pattern dominates. 0 when nothing was used.
    """
    counts = np.asarray(joint, dtype=np.float64)
    used = counts.sum(axis=0)
    mask = used > 0
    if not mask.any():
        return 0.0
    return float(np.mean(counts[:, mask].max(axis=0) / used[mask] > threshold))


#: Prefix of the metrics a client computes on its own test set (``test-accuracy``, ``test-num-examples``, ...).
CLIENT_TEST_PREFIX = "test-"


def weighted_means(
    rows: Sequence[Mapping[str, float]], groups: Sequence[str] = ("", CLIENT_TEST_PREFIX)
) -> dict[str, float]:
    """Sample-weighted means of several clients' metrics, each group of metrics weighted by its own count.

    A group is a key prefix: ``"test-accuracy"`` belongs to group ``"test-"`` and is weighted by
    ``"test-num-examples"``; ``"accuracy"`` to group ``""``, weighted by ``"num-examples"``. A
    row without (or with zero) examples in a group adds nothing to that group's means; a key
    is averaged over the rows that have it. The sums run in the order of ``rows``.

    Args:
        rows: per client, metric name -> value (finite numbers), counts included.
        groups: the prefixes, ``""`` (the unprefixed keys) first.

    Returns:
        Every key's weighted mean, and each group's count summed (only groups with examples).
    """

    def group_of(key: str) -> str:
        return max((g for g in groups if key.startswith(g)), key=len)

    out: dict[str, float] = {}
    for group in groups:
        count_key = group + "num-examples"
        members = [r for r in rows if float(r.get(count_key, 0) or 0) > 0]
        if not members:
            continue
        keys = sorted({k for r in members for k in r if group_of(k) == group and k != count_key})
        for key in keys:
            having = [r for r in members if key in r]
            total = sum(float(r[count_key]) for r in having)
            out[key] = sum(float(r[count_key]) * float(r[key]) for r in having) / total
        out[count_key] = int(sum(float(r[count_key]) for r in members))
    return out
