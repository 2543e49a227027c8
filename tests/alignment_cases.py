"""Planted alignment rounds shared by the alignment-solver tests (and the frozen fixture they check).

A round as :func:`~fedprime_core.method.interpool.aggregate_inter_pool` hands it to
:func:`~fedprime_core.method.aggregation.align_prompts`: every client holds ``tau`` slots
(distinct cluster labels of a pool of ``centres``), used some of them this round (ragged:
``m_t`` between ``tau / 2`` and ``tau``), and sends the used prompts, their keys and usage
counts. A used prompt lies near the centre its slot held, except that with probability
``moved`` it drifted to a centre the client does not hold (so the warm start is wrong for it
and the alignment has to move it). ``fresh`` is the share of clients whose prompts have no
warm-start label (``-1``: ``inter-init=independent``'s never-merged prompts).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def planted_round(
    n: int,
    tau: int,
    centres: int,
    dim: int = 24,
    noise: float = 0.05,
    moved: float = 0.1,
    fresh: float = 0.0,
    ragged: bool = True,
    duplicate_centres: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """One planted round (module docstring). ``duplicate_centres`` copies centre 0 onto centres 1..k (exact ties)."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(centres, dim))
    pool_keys = rng.normal(size=(centres, dim))
    profiles = rng.dirichlet(np.ones(3), size=centres)  # a usage profile over 3 missing patterns per centre
    pool[1 : 1 + duplicate_centres] = pool[0]
    pool_keys[1 : 1 + duplicate_centres] = pool_keys[0]
    profiles[1 : 1 + duplicate_centres] = profiles[0]
    prompts, keys, usage, init, truth, features = [], [], [], [], [], []
    for t in range(n):
        slots = rng.choice(centres, tau, replace=False)
        m = int(rng.integers(max(tau // 2, 1), tau + 1)) if ragged else tau
        rows = np.sort(rng.choice(tau, m, replace=False))
        held = slots[rows].copy()
        true = held.copy()
        spare = [c for c in range(centres) if c not in set(slots.tolist())]
        for p in range(m):
            if spare and rng.random() < moved:
                true[p] = spare.pop(int(rng.integers(len(spare))))
        prompts.append(pool[true] + noise * rng.normal(size=(m, dim)))
        keys.append(pool_keys[true] + noise * rng.normal(size=(m, dim)))
        features.append(profiles[true] + 0.2 * noise * rng.normal(size=(m, 3)))
        usage.append(rng.integers(1, 50, m).astype(np.float64))
        init.append(np.full(m, -1, dtype=np.int64) if t < round(fresh * n) else held)
        truth.append(true)
    return {
        "prompts": prompts,
        "keys": keys,
        "usage": usage,
        "init": init,
        "truth": truth,
        "features": features,
    }


#: The frozen cases: name -> (planted_round arguments, align_prompts regime). Widths of 48
#: exercise the fast solver's pass cache; below 32 it computes every step exactly.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "warm-4x10": ({"n": 4, "tau": 10, "centres": 14, "dim": 48, "seed": 1}, {"start": "warm"}),
    "warm-8x20": ({"n": 8, "tau": 20, "centres": 24, "dim": 48, "seed": 2}, {"start": "warm"}),
    "warm-20x20": ({"n": 20, "tau": 20, "centres": 30, "dim": 48, "seed": 3}, {"start": "warm"}),
    "warm-20x10-moved": ({"n": 20, "tau": 10, "centres": 16, "dim": 48, "moved": 0.3, "seed": 4}, {"start": "warm"}),
    "warm-20x10-narrow": ({"n": 20, "tau": 10, "centres": 16, "dim": 24, "moved": 0.3, "seed": 9}, {"start": "warm"}),
    "cold-12x10": ({"n": 12, "tau": 10, "centres": 16, "dim": 48, "seed": 5}, {"start": "cold"}),
    "independent-12x10": ({"n": 12, "tau": 10, "centres": 16, "dim": 48, "fresh": 0.5, "seed": 6}, {"start": "warm"}),
    "usage-12x10": ({"n": 12, "tau": 10, "centres": 16, "dim": 48, "seed": 7}, {"start": "warm", "on": "usage"}),
    "empirical-cold-12x10": (
        {"n": 12, "tau": 10, "centres": 16, "dim": 48, "seed": 8},
        {"start": "cold", "popularity": "empirical"},
    ),
}


def align_case(round_: dict[str, Any], regime: dict[str, Any], **kwargs: Any) -> Any:
    """``align_prompts`` on a planted round the way ``aggregate_inter_pool`` calls it, in ``regime``."""
    from fedprime_core.method.aggregation import align_prompts

    return align_prompts(
        round_["prompts"],
        client_keys=round_["keys"],
        init_assignments=round_["init"] if regime.get("start", "warm") == "warm" else None,
        prompt_weights=round_["usage"],
        client_features=round_["features"] if regime.get("on") == "usage" else None,
        popularity=regime.get("popularity", "learned"),
        n_sweeps=5,
        seed=11,
        **kwargs,
    )
