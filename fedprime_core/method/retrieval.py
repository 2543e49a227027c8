"""Input-adaptive prompt retrieval (L2P-style) and its regulariser.

Relevance of prompt ``p`` to input ``x(M)`` is ``cos(q(x(M)), k(p))``. Each sample takes
its own top-kappa prompts (``mode="sample"``), so a prediction never depends on what
else shares the batch. ``mode="batch"`` reproduces the reference code's rule (the kappa
indices most often in the per-sample top-kappa across the batch, used for every sample)
and exists only to compare against.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .methods import SELECTIONS


def cosine_relevance(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query to every key.

    Args:
        queries: ``(B, d)``.
        keys: ``(P, d)``.

    Returns:
        ``(B, P)`` in ``[-1, 1]``.
    """
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t()


def select_prompts(relevance: torch.Tensor, kappa: int, mode: str = "sample") -> torch.Tensor:
    """Indices of the prompts each sample uses.

    Args:
        relevance: ``(B, P)`` query-key similarities.
        kappa: prompts per sample; clipped to ``P``.
        mode: ``"sample"`` (per-sample top-kappa) or ``"batch"`` (reference rule).

    Returns:
        ``(B, kappa)`` long indices, sorted by decreasing relevance for ``"sample"``.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"selection mode {mode!r} is not one of {SELECTIONS}")
    kappa = min(kappa, relevance.shape[1])
    top = relevance.topk(kappa, dim=1).indices
    if mode == "sample":
        return top
    counts = torch.bincount(top.flatten(), minlength=relevance.shape[1]).to(relevance.dtype)
    # Break ties between equally frequent prompts by their mean relevance over the batch.
    score = counts + relevance.mean(dim=0).clamp(-1, 1) * 1e-3
    chosen = score.topk(kappa).indices
    return chosen.unsqueeze(0).expand(relevance.shape[0], -1)


def retrieval_regulariser(relevance: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The paper's ``r(x(M), w'_p) = sum_{p selected} d(x(M), p)``, averaged over the batch.

    With the cosine distance ``d = 1 - cos(q(x), k(p))`` it pulls each selected key towards
    the queries that select it, so that a prompt specialises on the inputs of its
    neighbourhood. ``lambda`` (config) weighs this per-sample sum over the ``kappa``
    selected prompts of each pool (both pools add their own term). The reference code
    adds ``+cos`` (pushing keys away) or drops the term; this is the sign the paper
    describes.

    Args:
        relevance: ``(B, P)``.
        selected: ``(B, kappa)`` indices into ``P``.

    Returns:
        A scalar tensor in ``[0, 2 kappa]``.
    """
    return (1.0 - relevance.gather(1, selected)).sum(dim=1).mean()


def usage_counts(selected: torch.Tensor, pool_size: int) -> torch.Tensor:
    """How often each prompt was selected: ``(pool_size,)`` long counts."""
    return torch.bincount(selected.flatten(), minlength=pool_size)


def pattern_usage_counts(selected: torch.Tensor, patterns: torch.Tensor, pool_size: int) -> torch.Tensor:
    """How often each prompt was selected by samples of each missing pattern.

    Args:
        selected: ``(B, kappa)`` indices into the pool.
        patterns: ``(B,)`` missing pattern of each sample (0 complete, 1 text missing, 2 image missing).
        pool_size: ``P``.

    Returns:
        ``(3, P)`` long counts; its column sums are :func:`usage_counts`.
    """
    flat = (patterns.long().unsqueeze(1) * pool_size + selected).flatten()
    return torch.bincount(flat, minlength=3 * pool_size).view(3, pool_size)
