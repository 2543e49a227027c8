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
  the ``tau`` most popular centres, most popular first.

Everything here is a pure function of NumPy arrays: :class:`InterPool` is immutable and
every operation returns a new one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..metrics import entropy_bits, mutual_information_bits, specialised_share
from .aggregation import align_prompts

#: Factor applied each round to the popularity of a cluster that no participating client used.
UNUSED_DECAY = 0.5
#: Popularity of the clusters of a fresh pool (before any client has used one).
INITIAL_POPULARITY = 0.5
#: A cluster counts as specialised when one missing pattern accounts for more than this share of its uses.
SPECIALISED_THRESHOLD = 0.8
MERGE_MODES = ("align", "position")


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
    """

    ids: np.ndarray
    prompts: np.ndarray
    keys: np.ndarray
    popularity: np.ndarray
    next_id: int
    slots: Mapping[str, np.ndarray]
    tau: int

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


def assign_slots(pool: InterPool, client: str, mode: str = "align") -> tuple[InterPool, np.ndarray]:
    """The slots ``client`` holds this round, recorded in the returned pool.

    A known client keeps its slots; any slot whose cluster has since been dropped is
    refilled with the most popular cluster it does not hold. A new client gets the ``tau``
    most popular clusters. With ``mode="position"`` slot ``p`` always holds cluster ``p``.

    Returns:
        ``(pool with the client's slots recorded, (tau,) cluster ids)``.
    """
    if pool.size < pool.tau:
        raise ValueError(f"the inter pool holds {pool.size} clusters, fewer than tau = {pool.tau}")
    current = pool.slots.get(client)
    if mode == "position":
        slots = np.arange(pool.tau, dtype=np.int64)
    elif current is None:
        slots = pool.most_popular(pool.tau)
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


def aggregate_inter_pool(
    pool: InterPool,
    updates: Sequence[InterUpdate],
    *,
    mode: str = "align",
    max_size: int = 100,
    sweeps: int = 5,
    seed: int = 0,
) -> tuple[InterPool, dict[str, Any]]:
    """Merge the participating clients' inter prompts and give each client its new slots.

    Args:
        pool: the pool the clients started from (their slots recorded by :func:`assign_slots`).
        updates: one per participating client whose slots are in ``pool``.
        mode: ``"align"`` (content, FedPrime) or ``"position"`` (slot ``p`` with slot ``p``).
        max_size: bound on the number of clusters (``inter-pool-max``), at least ``tau``.
        sweeps: alignment sweeps (``align`` only).
        seed: alignment seed (seed it per round for determinism).

    Returns:
        ``(new pool, report)``. The report holds the pool size, clusters opened, carried
        over and dropped, how many used prompts left the cluster they started in
        (``inter-rematched``), the alignment objective and timings, and how much the
        sample's missing pattern tells about the cluster it retrieves
        (``inter-specialisation-bits``, ``inter-pattern-entropy-bits``,
        ``inter-specialised-share``) when pattern usage was reported.

    Raises:
        ValueError: unknown mode, a client without recorded slots, or shapes that do not fit.
    """
    start = time.perf_counter()
    if mode not in MERGE_MODES:
        raise ValueError(f"inter merge mode {mode!r} is not one of {MERGE_MODES}")
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
        compact = {int(label): k for k, label in enumerate(labels)}
        result = align_prompts(
            [
                np.asarray(updates[i].prompts, dtype=np.float64)[used_rows[i]].reshape(used_rows[i].size, -1)
                for i in active
            ],
            client_keys=[np.asarray(updates[i].keys, dtype=np.float64)[used_rows[i]] for i in active],
            init_assignments=[np.array([compact[int(s)] for s in client_slots[i][used_rows[i]]]) for i in active],
            prompt_weights=[np.asarray(updates[i].usage, dtype=np.float64)[used_rows[i]] for i in active],
            n_sweeps=sweeps,
            seed=seed,
        )
        out_ids = np.empty(result.centres.shape[0], dtype=np.int64)
        for j, source in enumerate(result.source_labels):
            if source >= 0:
                out_ids[j] = labels[source]
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
        # Position: cluster p is slot p of every client (slots are the identity in this mode).
        if any(not np.array_equal(client_slots[i], np.arange(pool.tau)) for i in active):
            raise ValueError("position merge needs slot p of every client to hold cluster p (assign_slots mode)")
        for p in range(pool.tau):
            users = [i for i in active if np.asarray(updates[i].usage)[p] > 0]
            if not users:
                continue
            w = np.array([float(np.asarray(updates[i].usage)[p]) for i in users])
            centre = np.tensordot(w, np.stack([np.asarray(updates[i].prompts)[p] for i in users]), axes=1) / w.sum()
            key = np.tensordot(w, np.stack([np.asarray(updates[i].keys)[p] for i in users]), axes=1) / w.sum()
            cid = int(client_slots[users[0]][p])
            merged[cid] = (centre, key, len(users) / len(active))
            for i in users:
                assigned[i][p] = client_slots[i][p]
        report["inter-largest-cluster"] = max(
            int(sum(np.asarray(updates[i].usage)[p] > 0 for i in active)) for p in range(pool.tau)
        )
    started_in = np.concatenate([client_slots[i][used_rows[i]] for i in active]) if active else np.zeros(0)
    ended_in = np.concatenate([assigned[i][used_rows[i]] for i in active]) if active else np.zeros(0)
    report["inter-rematched"] = int(np.sum(started_in != ended_in))
    report["inter-clusters-opened"] = int(next_id - pool.next_id)

    # 2. The new pool: merged clusters, the rest carried over with decayed popularity,
    #    bounded by max_size (least popular dropped; this round's clusters win ties).
    entries: dict[int, tuple[np.ndarray, np.ndarray, float, bool]] = {
        cid: (c, k, u, True) for cid, (c, k, u) in merged.items()
    }
    for row, cid in enumerate(pool.ids.tolist()):
        if cid not in entries:
            entries[cid] = (pool.prompts[row], pool.keys[row], float(pool.popularity[row]) * UNUSED_DECAY, False)
    order = sorted(entries, key=lambda cid: (-entries[cid][2], not entries[cid][3], cid))
    kept, dropped = order[:max_size], order[max_size:]
    report["inter-clusters-carried"] = sum(not entries[cid][3] for cid in kept)
    report["inter-clusters-dropped"] = len(dropped)
    new_pool = InterPool(
        ids=np.asarray(kept, dtype=np.int64),
        prompts=np.stack([entries[cid][0] for cid in kept]).astype(np.float32),
        keys=np.stack([entries[cid][1] for cid in kept]).astype(np.float32),
        popularity=np.asarray([entries[cid][2] for cid in kept], dtype=np.float64),
        next_id=next_id,
        slots=dict(pool.slots),
        tau=pool.tau,
    )

    # 3. Each participant's slots: the cluster its prompt was matched to, else the one it
    #    held, else (dropped, or taken by another of its slots) the most popular it lacks.
    alive = set(kept)
    new_slots = dict(pool.slots)
    for i, update in enumerate(updates):
        slots = np.where(np.isin(assigned[i], kept), assigned[i], -1)
        held = set(slots[slots >= 0].tolist())
        for p in np.flatnonzero(slots < 0):
            old = int(client_slots[i][p])
            if assigned[i][p] < 0 and old in alive and old not in held:
                slots[p] = old
                held.add(old)
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            slots[missing] = new_pool.most_popular(missing.size, exclude=held)
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
