"""Label partitions across clients: IID (per-label even split) and Dirichlet label skew,
optionally with imbalanced client sizes.

Partitions are pure functions of ``(labels, num_clients, alpha, min_size, seed, size_sigma)``;
they never look at anything else. (``flwr-datasets`` has equivalent partitioners, but it works
on HF ``datasets`` objects and would pull Flower into ``fedprime_core``, which must stay
framework-free; these few lines are ours and tested.)
"""

from __future__ import annotations

import numpy as np


def _check(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_samples < num_clients * min_size:
        raise ValueError(
            f"{num_samples} samples cannot give {num_clients} clients at least {min_size} each; "
            "lower min-partition-size or the number of clients, or use more data"
        )


def iid_partition(labels: np.ndarray, num_clients: int, min_size: int, seed: int) -> list[np.ndarray]:
    """Split every label's samples evenly (shuffled) across clients.

    Returns:
        ``num_clients`` sorted index arrays that are disjoint and cover ``range(N)``.
    """
    labels = np.asarray(labels)
    _check(labels.size, num_clients, min_size)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    offset = 0
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        # Rotate the starting client so remainders do not always land on client 0.
        chunks = np.array_split(idx, num_clients)
        for i, chunk in enumerate(chunks):
            parts[(i + offset) % num_clients].append(chunk)
        offset += len(idx) % num_clients
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def client_size_weights(num_clients: int, sigma: float, seed: int) -> np.ndarray:
    """Relative client sizes for an imbalanced federation: ``exp(sigma * N(0, 1))`` per client.

    A seeded log-normal draw (the usual model of unbalanced client sizes), normalised to sum
    to 1; ``sigma = 0`` gives equal weights. Drawn from its own random stream, so the label
    split's draws are the same with and without it.

    Returns:
        ``(num_clients,)`` positive weights summing to 1.
    """
    if sigma < 0:
        raise ValueError(f"client-size sigma must be non-negative, got {sigma}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51CE]))
    weights = np.exp(sigma * rng.standard_normal(num_clients))
    return weights / weights.sum()


def weighted_iid_partition(
    labels: np.ndarray, num_clients: int, min_size: int, seed: int, weights: np.ndarray
) -> list[np.ndarray]:
    """IID labels, imbalanced sizes: every label is split across clients in proportion to ``weights``.

    Each client's label mix is the global one; its size is about ``weights[c] * N``. Clients
    below ``min_size`` receive samples from the largest until every one has ``min_size``.
    """
    labels = np.asarray(labels)
    _check(labels.size, num_clients, min_size)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(weights) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    _top_up(parts, min_size, rng, labels.size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator, limit: int) -> None:
    """Move random samples from the largest client to the smallest until every one has ``min_size``."""
    for _ in range(limit):
        sizes = [len(p) for p in parts]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= min_size:
            break
        parts[small].append(parts[large].pop(int(rng.integers(len(parts[large])))))


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
    max_tries: int = 100,
    weights: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew: each label's samples are split by a Dirichlet draw.

    Draws are repeated (up to ``max_tries``) until every client has ``min_size`` samples;
    if that never happens, the largest clients give samples to the smallest until it holds.
    With ``weights`` (imbalanced sizes, :func:`client_size_weights`), each label's Dirichlet
    shares are multiplied by the clients' weights and renormalised, so client ``c`` expects
    a share of every label proportional to ``weights[c]`` times its Dirichlet draw.

    Returns:
        ``num_clients`` sorted, disjoint index arrays covering ``range(N)``.
    """
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    _check(labels.size, num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for label in classes:
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            if weights is not None:
                shares = shares * weights / np.sum(shares * weights)
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _top_up(parts, min_size, rng, labels.size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int, size_sigma: float = 0.0
) -> list[np.ndarray]:
    """IID when ``alpha == 0``, Dirichlet(alpha) label skew otherwise.

    ``size_sigma > 0`` makes client sizes imbalanced (log-normal weights,
    :func:`client_size_weights`); ``0`` keeps the balanced IID split and the plain
    Dirichlet draw.
    """
    if size_sigma < 0:
        raise ValueError(f"client-size sigma must be non-negative, got {size_sigma}")
    weights = client_size_weights(num_clients, size_sigma, seed) if size_sigma > 0 else None
    if alpha == 0:
        if weights is None:
            return iid_partition(labels, num_clients, min_size, seed)
        return weighted_iid_partition(labels, num_clients, min_size, seed, weights)
    return dirichlet_partition(labels, num_clients, alpha, min_size, seed, weights=weights)
