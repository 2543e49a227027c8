"""Personalised inter-client prompt pools, FedMA / PFNM style, and the global pool of cluster centres.

Why: FedPrime aligns inter-client prompts by *content* because position ``p`` on two
clients may hold prompts that encode different missing-data patterns. That can only
happen if a client's pool persists and drifts in its own way; if every client restarted
every round from one identical global pool, position ``p`` would mean the same prompt
everywhere and any alignment would reduce to averaging by position.

The protocol implemented here:

* The **global inter pool** is a set of cluster centres with stable integer ids, merged
  keys and a popularity in ``(0, 1]``, bounded by ``max_size`` (``inter-pool-max``). It is
  what the server evaluates, checkpoints and reports, and what a new client starts from.
* Every client owns ``tau`` **slots**; slot ``p`` of client ``t`` holds one cluster id
  (``slots[t][p]``), distinct within the client. The client receives the centres (and
  keys) of its own slots only, in its own slot order, trains them, and sends them back
  with how often it retrieved each one.
* **Aggregation** (:func:`aggregate_inter_pool`): the prompts a client used this round
  are aligned on content with :func:`~fedprime_core.method.aggregation.align_prompts`, warm-started
  in the clusters their slots held, weighted by their usage counts. Each client's slot
  then holds the centre of the cluster its prompt was matched to; unused slots keep their
  cluster; slots whose cluster was dropped are refilled with the most popular centres the
  client does not hold. Clusters nobody used this round are carried over with their
  popularity multiplied by :data:`UNUSED_DECAY`; new clusters can open; the least popular
  clusters beyond ``max_size`` are dropped.
* ``mode="position"`` is the ablation the paper argues against, in the same protocol:
  cluster ``p`` *is* slot ``p`` of every client (the pool never exceeds ``tau``) and is the
  usage-weighted average of the slot-``p`` prompts of the clients that used it.
* A client seen for the first time (a late joiner, or one not sampled before) starts from
  the ``tau`` most popular centres, most popular first (``init="shared"``), or from ``tau``
  clusters of its own, seeded random prompts and keys drawn like the model's initial ones
  (``init="independent"``: the FedMA / PFNM regime, where slot ``p`` on two clients holds
  unrelated prompts, so that merging by position mixes them and matching is needed).

The regimes of the alignment (what makes it differ from merging by position):

* ``align_start="warm"`` starts the alignment from the clusters the slots held;
  ``"cold"`` aligns from scratch every round (as the paper and its reference code do) and
  then names each resulting cluster after the cluster most of its members' slots held
  (a maximum-weight matching of clusters to old ids), so ids stay stable where the
  grouping did.
* ``align_on`` says what the alignment compares: ``"prompt"`` the prompts themselves,
  ``"delta"`` each prompt's change this round (what local training wrote into it), or
  ``"usage"`` its retrieval profile over the missing patterns (the ``(3, tau)`` pattern
  usage counts, normalised per prompt). The merged centres are always the usage-weighted
  means of the member prompts.

Every round reports whether the alignment did anything position would not have done
(``inter-align-noop``: 1 when the used prompts are grouped exactly as slot index groups
them, so the merge equals the positional one), next to how many used prompts ended in a
cluster other than their slot's (``inter-rematched``).

Everything here is a pure function of NumPy arrays: :class:`InterPool` is immutable and
every operation returns a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..metrics import entropy_bits, mutual_information_bits, specialised_share
from .aggregation import align_prompts
from .regimes import ALIGN_ON, ALIGN_STARTS, INIT_MODES, MERGE_MODES

#: Factor applied each round to the popularity of a cluster that no participating client used.
UNUSED_DECAY = 0.5
#: Popularity of the clusters of a fresh pool (before any client has used one).
INITIAL_POPULARITY = 0.5
#: A cluster counts as specialised when one missing pattern accounts for more than this share of its uses.
SPECIALISED_THRESHOLD = 0.8


@dataclasses.dataclass(frozen=True)
class InterPool:
    """The global inter pool and every known client's slots.

    Attributes:
        ids: ``(K,)`` stable cluster ids, most popular first.
        prompts: ``(K, L, d)`` cluster centres (``L`` tokens per prompt).
        keys: ``(K, d)`` merged keys.
        popularity: ``(K,)`` in ``(0, 1]``.
        next_id: the id the next new cluster gets.
        slots: client id -> ``(tau,)`` cluster ids of its slots (distinct).
        tau: slots per client.
        init_scale: root-mean-square entry of the initial prompts and of the initial keys;
            a client's own pool (``init="independent"``) is drawn at that scale.
        fresh: ids of a client's own clusters that no merge has touched yet; their prompts
            have no cluster to warm-start in (the alignment places them from scratch).
    """

    ids: np.ndarray
    prompts: np.ndarray
    keys: np.ndarray
    popularity: np.ndarray
    next_id: int
    slots: Mapping[str, np.ndarray]
    tau: int
    init_scale: tuple[float, float] = (1.0, 1.0)
    fresh: frozenset[int] = frozenset()

    @classmethod
    def initial(cls, prompts: np.ndarray, keys: np.ndarray) -> InterPool:
        """A fresh pool of ``tau`` clusters (ids ``0..tau-1``) from the initial prompts ``(tau, L, d)``."""
        prompts = np.asarray(prompts, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.float32)
        if prompts.ndim != 3 or keys.shape != (prompts.shape[0], prompts.shape[2]):
            raise ValueError(f"prompts must be (tau, L, d) and keys (tau, d); got {prompts.shape} and {keys.shape}")
        tau = prompts.shape[0]
        return cls(
            ids=np.arange(tau, dtype=np.int64),
            prompts=prompts.copy(),
            keys=keys.copy(),
            popularity=np.full(tau, INITIAL_POPULARITY),
            next_id=tau,
            slots={},
            tau=tau,
            init_scale=(_rms(prompts), _rms(keys)),
        )

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given cluster ids in the pool arrays (``-1`` for ids not in the pool)."""
        lookup = dict(zip(self.ids.tolist(), range(self.size)))
        return np.array([lookup.get(int(i), -1) for i in np.asarray(ids).ravel()], dtype=np.int64)

    def most_popular(self, count: int, exclude: set[int] | frozenset[int] = frozenset()) -> np.ndarray:
        """The ``count`` most popular cluster ids not in ``exclude`` (ties: lower id first)."""
        order = np.lexsort((self.ids, -self.popularity))
        chosen = [int(i) for i in self.ids[order] if int(i) not in exclude][:count]
        return np.asarray(chosen, dtype=np.int64)

    def client_arrays(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prompts ``(tau, L, d)`` and keys ``(tau, d)`` a client with ``slots`` receives."""
        rows = self.index_of(slots)
        if np.any(rows < 0):
            raise ValueError(f"slots {np.asarray(slots)[rows < 0].tolist()} are not clusters of the pool")
        return self.prompts[rows].copy(), self.keys[rows].copy()

    def to_record(self) -> dict[str, Any]:
        """JSON-able bookkeeping (ids, popularity, next id, client slots); the arrays go separately."""
        return {
            "ids": self.ids.tolist(),
            "popularity": self.popularity.tolist(),
            "next-id": self.next_id,
            "tau": self.tau,
            "init-scale": list(self.init_scale),
            "fresh": sorted(self.fresh),
            "slots": {client: s.tolist() for client, s in sorted(self.slots.items())},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], prompts: np.ndarray, keys: np.ndarray) -> InterPool:
        """Rebuild a pool from :meth:`to_record` and its arrays (a checkpoint); checks consistency."""
        ids = np.asarray(record["ids"], dtype=np.int64)
        pool = cls(
            ids=ids,
            prompts=np.asarray(prompts, dtype=np.float32),
            keys=np.asarray(keys, dtype=np.float32),
            popularity=np.asarray(record["popularity"], dtype=np.float64),
            next_id=int(record["next-id"]),
            slots={str(c): np.asarray(s, dtype=np.int64) for c, s in record.get("slots", {}).items()},
            tau=int(record["tau"]),
            # checkpoints written before independent pools existed: only shared pools use them
            init_scale=tuple(float(x) for x in record.get("init-scale", (1.0, 1.0))),
            fresh=frozenset(int(x) for x in record.get("fresh", ())),
        )
        if pool.prompts.shape[0] != ids.size or pool.keys.shape[0] != ids.size or pool.popularity.size != ids.size:
            raise ValueError(
                f"inter pool record lists {ids.size} clusters but the arrays hold {pool.prompts.shape[0]} prompts "
                f"and {pool.keys.shape[0]} keys"
            )
        if len(np.unique(ids)) != ids.size or (ids.size and ids.max() >= pool.next_id):
            raise ValueError("inter pool record has repeated cluster ids or ids beyond next-id")
        for client, s in pool.slots.items():
            if s.shape != (pool.tau,) or len(np.unique(s)) != pool.tau:
                raise ValueError(f"inter pool record: client {client!r} must hold {pool.tau} distinct slots")
        return pool


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(values, dtype=np.float64))))) if np.size(values) else 1.0


def client_seed(seed: int, client: str) -> list[int]:
    """Entropy for ``np.random.default_rng`` that is stable across processes for ``(seed, client)``."""
    digest = hashlib.sha256(client.encode("utf-8")).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def own_pool(pool: InterPool, client: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own initial prompts ``(tau, L, d)`` and keys ``(tau, d)`` (``init="independent"``).

    Drawn as the model draws its pools, uniform with the initial pools' root-mean-square
    entry (:attr:`InterPool.init_scale`), from a generator seeded by ``seed`` and the client id.
    """
    rng = np.random.default_rng(client_seed(seed, client))
    bounds = np.sqrt(3.0) * np.asarray(pool.init_scale)
    prompts = rng.uniform(-bounds[0], bounds[0], size=(pool.tau, *pool.prompts.shape[1:]))
    keys = rng.uniform(-bounds[1], bounds[1], size=(pool.tau, pool.keys.shape[1]))
    return prompts.astype(np.float32), keys.astype(np.float32)


def assign_slots(
    pool: InterPool, client: str, mode: str = "align", init: str = "shared", seed: int = 0
) -> tuple[InterPool, np.ndarray]:
    """The slots ``client`` holds this round, recorded in the returned pool.

    A known client keeps its slots; any slot whose cluster has since been dropped is
    refilled with the most popular cluster it does not hold. A new client gets the ``tau``
    most popular clusters (``init="shared"``; with ``mode="position"`` slot ``p`` holds
    cluster ``p``), or ``tau`` new clusters holding its own seeded prompts and keys
    (``init="independent"``, :func:`own_pool`), which the next merge folds into the pool.

    Returns:
        ``(pool with the client's slots recorded, (tau,) cluster ids)``.
    """
    if init not in INIT_MODES:
        raise ValueError(f"inter init {init!r} is not one of {INIT_MODES}")
    if pool.size < pool.tau:
        raise ValueError(f"the inter pool holds {pool.size} clusters, fewer than tau = {pool.tau}")
    current = pool.slots.get(client)
    if current is None and init == "independent":
        prompts, keys = own_pool(pool, client, seed)
        slots = np.arange(pool.next_id, pool.next_id + pool.tau, dtype=np.int64)
        grown = dataclasses.replace(
            pool,
            ids=np.concatenate([pool.ids, slots]),
            prompts=np.concatenate([pool.prompts, prompts]),
            keys=np.concatenate([pool.keys, keys]),
            popularity=np.concatenate([pool.popularity, np.full(pool.tau, INITIAL_POPULARITY)]),
            next_id=pool.next_id + pool.tau,
            slots={**pool.slots, client: slots},
            fresh=pool.fresh | frozenset(slots.tolist()),
        )
        return grown, slots
    if current is None:
        slots = np.arange(pool.tau, dtype=np.int64) if mode == "position" else pool.most_popular(pool.tau)
    else:
        slots = np.asarray(current, dtype=np.int64).copy()
        alive = pool.index_of(slots) >= 0
        if not alive.all():
            refill = pool.most_popular(int((~alive).sum()), exclude=set(slots[alive].tolist()))
            slots[~alive] = refill
    if current is not None and np.array_equal(slots, current):
        return pool, slots
    return dataclasses.replace(pool, slots={**pool.slots, client: slots}), slots


@dataclasses.dataclass(frozen=True)
class InterUpdate:
    """One client's trained inter pool.

    Attributes:
        client: the client id its slots are recorded under.
        prompts: ``(tau, L, d)`` trained prompts, in its slot order.
        keys: ``(tau, d)`` trained keys.
        usage: ``(tau,)`` how often each prompt was retrieved this round.
        pattern_usage: ``(3, tau)`` the same counts split by the retrieving sample's
            missing pattern (complete, text-missing, image-missing), or ``None``.
    """

    client: str
    prompts: np.ndarray
    keys: np.ndarray
    usage: np.ndarray
    pattern_usage: np.ndarray | None = None


def _features(align_on: str, update: InterUpdate, sent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """What the alignment compares for ``update``'s used prompts ``rows``: ``(m, F)`` float64.

    ``sent`` is ``(tau, L, d)``, the prompts the client received this round (for ``delta``).
    """
    prompts = np.asarray(update.prompts, dtype=np.float64)[rows]
    if align_on == "prompt":
        return prompts.reshape(rows.size, -1)
    if align_on == "delta":
        return (prompts - np.asarray(sent, dtype=np.float64)[rows]).reshape(rows.size, -1)
    if update.pattern_usage is None:
        raise ValueError(f"client {update.client!r} sent no pattern usage, which align-on='usage' compares")
    table = np.asarray(update.pattern_usage, dtype=np.float64)[:, rows]  # (3, m)
    return (table / np.maximum(table.sum(axis=0), 1.0)).T


def _name_clusters(
    assignments: Sequence[np.ndarray],
    started: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    num: int,
    names: np.ndarray | None = None,
    candidates: set[int] | None = None,
) -> np.ndarray:
    """``(num,)`` the old cluster id each aligned cluster continues, or ``-1`` (it gets a new id).

    Clusters already named in ``names`` keep their name. The others are matched to the ids
    their members' slots held (``candidates`` only, when given; never an id already taken)
    by a maximum-weight matching (weight: the members' usage), so a cluster built from
    scratch keeps its id when its membership did; one sharing no member with a free old
    id gets ``-1``.

    Args:
        assignments: per client, ``(m_t,)`` the aligned cluster of each used prompt.
        started: per client, ``(m_t,)`` the cluster id its slot held.
        weights: per client, ``(m_t,)`` the prompt's usage.
        num: number of aligned clusters.
        names: ``(num,)`` names fixed already (``-1``: to be matched), default none.
        candidates: the old ids that may be matched (default: any).
    """
    names = np.full(num, -1, dtype=np.int64) if names is None else names.copy()
    taken = set(names[names >= 0].tolist())
    old = np.unique(np.concatenate(list(started))) if started else np.zeros(0, dtype=np.int64)
    old = np.array(
        [i for i in old.tolist() if i not in taken and (candidates is None or i in candidates)], dtype=np.int64
    )
    open_rows = np.flatnonzero(names < 0)
    if old.size == 0 or open_rows.size == 0:
        return names
    overlap = np.zeros((num, old.size))
    for labels, ids, w in zip(assignments, started, weights):
        known = np.isin(ids, old)
        np.add.at(overlap, (labels[known], np.searchsorted(old, ids[known])), w[known])
    rows, cols = linear_sum_assignment(overlap[open_rows], maximize=True)
    keep = overlap[open_rows[rows], cols] > 0
    names[open_rows[rows[keep]]] = old[cols[keep]]
    return names


def _same_partition(groups_a: Sequence[np.ndarray], groups_b: Sequence[np.ndarray]) -> bool:
    """Whether two labellings of the same items (per client, row-aligned) define the same partition."""
    a = np.concatenate(list(groups_a)) if groups_a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(list(groups_b)) if groups_b else np.zeros(0, dtype=np.int64)
    if a.size == 0:
        return True
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def aggregate_inter_pool(
    pool: InterPool,
    updates: Sequence[InterUpdate],
    *,
    mode: str = "align",
    max_size: int = 100,
    sweeps: int = 5,
    seed: int = 0,
    align_start: str = "warm",
    align_on: str = "prompt",
    theta_steps: int = 50,
    init: str = "shared",
) -> tuple[InterPool, dict[str, Any]]:
    """Merge the participating clients' inter prompts and give each client its new slots.

    Args:
        pool: the pool the clients started from (their slots recorded by :func:`assign_slots`).
        updates: one per participating client whose slots are in ``pool``.
        mode: ``"align"`` (content, FedPrime) or ``"position"`` (slot ``p`` with slot ``p``).
        max_size: bound on the number of clusters (``inter-pool-max``), at least ``tau``.
        sweeps: alignment sweeps (``align`` only).
        seed: alignment seed (seed it per round for determinism).
        align_start: ``"warm"`` (from the slots' clusters) or ``"cold"`` (from scratch).
        align_on: what the alignment compares: ``"prompt"``, ``"delta"`` (change this round)
            or ``"usage"`` (retrieval profile over missing patterns; needs pattern usage).
        theta_steps: Adam steps per theta-step of the alignment (``align-theta-steps``).
        init: how the clients' pools started (:func:`assign_slots`); with ``"independent"``
            the pool keeps only clusters merged this round or held by some client, and the
            positional merge folds every participant's own slots into the shared clusters
            ``0 .. tau-1``.

    Returns:
        ``(new pool, report)``. The report holds the pool size, clusters opened, carried
        over and dropped, how many used prompts left the cluster they started in
        (``inter-rematched``), whether the grouping equals the positional one
        (``inter-align-noop``, 0/1, align mode only), the alignment objective and timings, and how much the
        sample's missing pattern tells about the cluster it retrieves
        (``inter-specialisation-bits``, ``inter-pattern-entropy-bits``,
        ``inter-specialised-share``) when pattern usage was reported.

    Raises:
        ValueError: unknown mode, a client without recorded slots, shapes that do not fit,
            or ``align_on="usage"`` without pattern usage.
    """
    start = time.perf_counter()
    for name, value, allowed in (
        ("inter merge mode", mode, MERGE_MODES),
        ("align start", align_start, ALIGN_STARTS),
        ("align on", align_on, ALIGN_ON),
        ("inter init", init, INIT_MODES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {allowed}")
    if max_size < pool.tau:
        raise ValueError(f"max_size ({max_size}) must be at least tau ({pool.tau})")
    prompt_shape = pool.prompts.shape[1:]
    used_rows, client_slots = [], []
    for update in updates:
        if update.client not in pool.slots:
            raise ValueError(f"client {update.client!r} has no slots in the inter pool; call assign_slots first")
        if np.shape(update.prompts) != (pool.tau, *prompt_shape) or np.shape(update.keys) != (
            pool.tau,
            pool.keys.shape[1],
        ):
            raise ValueError(f"client {update.client!r}: inter prompts/keys do not have the pool's shapes")
        used_rows.append(np.flatnonzero(np.asarray(update.usage) > 0))
        client_slots.append(np.asarray(pool.slots[update.client], dtype=np.int64))
    report: dict[str, Any] = {"inter-prompts-in": int(sum(r.size for r in used_rows))}

    # 1. Merge: cluster id -> (centre, key, popularity) for the clusters used this round,
    #    and the cluster id each used prompt now belongs to.
    next_id = pool.next_id
    merged: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    assigned = [np.full(pool.tau, -1, dtype=np.int64) for _ in updates]
    active = [i for i, rows in enumerate(used_rows) if rows.size]
    if active and mode == "align":
        labels = np.unique(np.concatenate([client_slots[i][used_rows[i]] for i in active]))
        # a client's own clusters that no merge touched yet hold nothing to warm-start in
        compact = {int(label): (-1 if int(label) in pool.fresh else k) for k, label in enumerate(labels)}
        features = None
        if align_on != "prompt":
            features = [
                _features(align_on, updates[i], pool.client_arrays(client_slots[i])[0], used_rows[i]) for i in active
            ]
        result = align_prompts(
            [
                np.asarray(updates[i].prompts, dtype=np.float64)[used_rows[i]].reshape(used_rows[i].size, -1)
                for i in active
            ],
            client_keys=[np.asarray(updates[i].keys, dtype=np.float64)[used_rows[i]] for i in active],
            init_assignments=(
                [np.array([compact[int(s)] for s in client_slots[i][used_rows[i]]]) for i in active]
                if align_start == "warm"
                else None
            ),
            prompt_weights=[np.asarray(updates[i].usage, dtype=np.float64)[used_rows[i]] for i in active],
            client_features=features,
            n_sweeps=sweeps,
            grad_steps=theta_steps,
            seed=seed,
        )
        naming = (
            result.assignments,
            [client_slots[i][used_rows[i]] for i in active],
            [np.asarray(updates[i].usage, dtype=np.float64)[used_rows[i]] for i in active],
            result.centres.shape[0],
        )
        if align_start == "warm":  # warm-started clusters keep their ids; a client's own fresh ones continue
            sources = np.where(result.source_labels >= 0, labels[np.maximum(result.source_labels, 0)], -1)
            if pool.fresh:
                sources = _name_clusters(*naming, names=sources, candidates=set(pool.fresh))
        else:
            sources = _name_clusters(*naming)
        out_ids = np.empty(result.centres.shape[0], dtype=np.int64)
        for j, source in enumerate(sources):
            if source >= 0:
                out_ids[j] = source
            else:
                out_ids[j] = next_id
                next_id += 1
        for j, cid in enumerate(out_ids):
            merged[int(cid)] = (result.centres[j].reshape(prompt_shape), result.keys[j], float(result.popularity[j]))
        for k, i in enumerate(active):
            assigned[i][used_rows[i]] = out_ids[result.assignments[k]]
        report.update(
            {
                "inter-align-objective": float(result.objective) if np.isfinite(result.objective) else 0.0,
                "inter-align-sweeps": len(result.objective_trace) - 1,
                "inter-largest-cluster": int(result.cluster_sizes.max()),
                "inter-align-seconds": result.total_seconds,
            }
        )
    elif active:
        # Position: cluster p is slot p of every client (its own slots, under independent
        # init, are folded into the shared cluster p).
        for p in range(pool.tau):
            users = [i for i in active if np.asarray(updates[i].usage)[p] > 0]
            if not users:
                continue
            w = np.array([float(np.asarray(updates[i].usage)[p]) for i in users])
            centre = np.tensordot(w, np.stack([np.asarray(updates[i].prompts)[p] for i in users]), axes=1) / w.sum()
            key = np.tensordot(w, np.stack([np.asarray(updates[i].keys)[p] for i in users]), axes=1) / w.sum()
            merged[p] = (centre, key, len(users) / len(active))
            for i in users:
                assigned[i][p] = p
        report["inter-largest-cluster"] = max(
            int(sum(np.asarray(updates[i].usage)[p] > 0 for i in active)) for p in range(pool.tau)
        )
    started_in = np.concatenate([client_slots[i][used_rows[i]] for i in active]) if active else np.zeros(0)
    ended_in = np.concatenate([assigned[i][used_rows[i]] for i in active]) if active else np.zeros(0)
    report["inter-rematched"] = int(np.sum(started_in != ended_in))
    report["inter-clusters-opened"] = int(next_id - pool.next_id)
    if mode == "align":
        report["inter-align-noop"] = int(
            _same_partition([assigned[i][used_rows[i]] for i in active], [used_rows[i] for i in active])
        )

    # 2. The new pool: merged clusters, the rest carried over with decayed popularity,
    #    bounded by max_size (least popular dropped; this round's clusters win ties).
    #    Position mode keeps its tau shared clusters; with independent init only clusters
    #    some client still holds are carried (a participant's own slots end up merged).
    participants = {u.client for u in updates}
    if mode == "position":
        held = {int(c) for client, s in pool.slots.items() if client not in participants for c in s}
        carry = held | set(range(pool.tau))
    elif init == "independent":
        held = {int(c) for client, s in pool.slots.items() if client not in participants for c in s}
        for i in range(len(updates)):
            unused = np.setdiff1d(np.arange(pool.tau), used_rows[i])
            held.update(int(c) for c in client_slots[i][unused])
        carry = held
    else:
        carry = None  # every cluster
    entries: dict[int, tuple[np.ndarray, np.ndarray, float, bool]] = {
        cid: (c, k, u, True) for cid, (c, k, u) in merged.items()
    }
    for row, cid in enumerate(pool.ids.tolist()):
        if cid not in entries and (carry is None or cid in carry):
            entries[cid] = (pool.prompts[row], pool.keys[row], float(pool.popularity[row]) * UNUSED_DECAY, False)
    # (position mode never drops its shared clusters 0 .. tau-1: every participant's slots hold them)
    shared_last = mode == "position"
    order = sorted(
        entries, key=lambda cid: (shared_last and cid >= pool.tau, -entries[cid][2], not entries[cid][3], cid)
    )
    kept, dropped = order[:max_size], order[max_size:]
    report["inter-clusters-carried"] = sum(not entries[cid][3] for cid in kept)
    report["inter-clusters-dropped"] = len(dropped)
    new_pool = dataclasses.replace(
        pool,
        ids=np.asarray(kept, dtype=np.int64),
        prompts=np.stack([entries[cid][0] for cid in kept]).astype(np.float32),
        keys=np.stack([entries[cid][1] for cid in kept]).astype(np.float32),
        popularity=np.asarray([entries[cid][2] for cid in kept], dtype=np.float64),
        next_id=next_id,
        slots=dict(pool.slots),
        fresh=frozenset(pool.fresh - set(merged)) & frozenset(kept),
    )

    # 3. Each participant's slots: the cluster its prompt was matched to, else the one it
    #    held, else (dropped, or taken by another of its slots) the most popular it lacks.
    #    Position mode: slot p holds cluster p.
    alive = set(kept)
    new_slots = dict(pool.slots)
    for i, update in enumerate(updates):
        if mode == "position":
            new_slots[update.client] = np.arange(pool.tau, dtype=np.int64)
            continue
        slots = np.where(np.isin(assigned[i], kept), assigned[i], -1)
        held_now = set(slots[slots >= 0].tolist())
        for p in np.flatnonzero(slots < 0):
            old = int(client_slots[i][p])
            if assigned[i][p] < 0 and old in alive and old not in held_now:
                slots[p] = old
                held_now.add(old)
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            slots[missing] = new_pool.most_popular(missing.size, exclude=held_now)
        new_slots[update.client] = slots
    new_pool = dataclasses.replace(new_pool, slots=new_slots)
    report["inter-pool-size"] = new_pool.size

    # 4. Does a sample's missing pattern tell which cluster it retrieves? (the paper's hypothesis)
    patterns = [(i, u.pattern_usage) for i, u in enumerate(updates) if u.pattern_usage is not None]
    if patterns:
        joint: dict[int, np.ndarray] = {}
        for i, counts in patterns:
            counts = np.asarray(counts, dtype=np.float64)
            for p in used_rows[i]:
                cid = int(assigned[i][p])
                joint[cid] = joint.get(cid, np.zeros(counts.shape[0])) + counts[:, p]
        table = np.stack(list(joint.values()), axis=1) if joint else np.zeros((3, 0))
        report["inter-specialisation-bits"] = mutual_information_bits(table)
        report["inter-pattern-entropy-bits"] = entropy_bits(table.sum(axis=1))
        report["inter-specialised-share"] = specialised_share(table, SPECIALISED_THRESHOLD)
    report["inter-aggregation-seconds"] = time.perf_counter() - start
    return new_pool, report
