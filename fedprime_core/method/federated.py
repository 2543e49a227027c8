"""One federated round on plain arrays: validate client updates, aggregate them.

Framework-free: the Flower strategy turns messages into :class:`ClientUpdate` objects and
calls :func:`validate_update` and :func:`aggregate_round`; a notebook, a benchmark or
another FL framework can do the same.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..identity import (  # noqa: F401 - re-exported: the method's names for a client's id
    CLIENT_ID_PATTERN,
    MAX_CLIENT_ID_CHARS,
    client_id_problem,
    client_identity,
)
from .aggregation import fedavg
from .interpool import InterPool, InterUpdate, aggregate_inter_pool, assign_slots
from .methods import MethodSpec
from .pfpt import aggregate_pfpt_pool

#: Rows of a pattern-usage table: the missing pattern of the retrieving sample.
NUM_PATTERNS = 3


@dataclasses.dataclass
class ClientUpdate:
    """What one client sends back after local training.

    Attributes:
        state: exchanged arrays (``name -> array``), same names and shapes as the global state.
        num_examples: training samples (the FedAvg weight).
        usage: pool name -> ``(pool_size,)`` selection counts over the round.
        client_id: the client's identity (:func:`client_identity`); keys its personal pools.
        metrics: scalar training metrics (loss, ...), reported as-is.
        pattern_usage: pool name -> ``(3, pool_size)`` the usage counts split by the
            missing pattern of the retrieving sample (optional; feeds a diagnostic).
        wire: how the arrays travelled (``"float16"``, ``"bfloat16 delta"``, ...:
            :mod:`fedprime_core.wire`); ``state`` holds them decoded to float32 (a delta
            already added to what the server sent). Named in rejection reasons.
    """

    state: Mapping[str, np.ndarray]
    num_examples: int
    usage: Mapping[str, np.ndarray]
    client_id: str = ""
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    pattern_usage: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    wire: str = "float32"


def client_order(client_id: str) -> tuple[int, int, str, str]:
    """Sort key for client ids: numeric ids by value ("2" before "10"), then the others.

    :func:`aggregate_round` aggregates updates in this order, not in the order replies
    arrived (updates with one client id keep their given order: the sort is stable), and
    the strategy records each round's outcomes in it. Numeric means ASCII digits only
    (``"²"`` is a digit to :meth:`str.isdigit`, but no number); numbers are compared by
    length and digits, never converted, so no id is too long to sort.
    """
    if client_id.isascii() and client_id.isdecimal():
        digits = client_id.lstrip("0") or "0"
        return (0, len(digits), digits, client_id)
    return (1, 0, client_id, "")


def mean_train_loss(updates: Sequence[ClientUpdate]) -> float:
    """Sample-weighted mean ``train-loss`` of the updates that report one (NaN when none does).

    Each loss is weighed by its share of the samples (at most 1), and the sums are exact
    (:func:`math.fsum`): whatever the sample counts, the mean of finite losses is finite.
    """
    pairs = [(float(u.num_examples), float(u.metrics["train-loss"])) for u in updates if "train-loss" in u.metrics]
    total = math.fsum(weight for weight, _ in pairs)
    if not pairs or total <= 0:
        return float("nan")
    return math.fsum((weight / total) * loss for weight, loss in pairs)


def array_norm(array: np.ndarray) -> float:
    """L2 norm of an array (float64 accumulation)."""
    return float(np.sqrt(np.sum(np.square(np.asarray(array, dtype=np.float64)))))


def validate_update(
    update: Any,
    expected: Mapping[str, tuple[int, ...]],
    pools: Sequence[str],
    max_norm: float,
    pattern_usage_required: Sequence[str] = (),
    max_uses_per_example: int | None = None,
) -> list[str]:
    """Every reason to reject a client update; an empty list means it is valid.

    Checks, in one place: the update's type and fields; exactly the expected array names;
    floating dtypes; shapes; finite values (after the wire cast: a NaN or inf that arrived
    in float16 or bfloat16 is rejected like one in float32, and the reason says how it
    travelled; a sender never turns a finite value into inf, :mod:`fedprime_core.wire`);
    L2 norm of each array at most ``max_norm``;
    a usage-count vector per pool whose length equals that pool's size, with non-negative
    integer counts and at least one use; pattern-usage tables (when sent) of shape
    ``(3, pool size)`` whose columns add up to the usage counts; a positive integer
    sample count; and, with ``max_uses_per_example``, at most that many uses of each pool
    per sample (the counts weigh the merged inter centres, so one client must not outweigh
    the samples it trained). Never raises, whatever it is given.

    Args:
        update: the candidate :class:`ClientUpdate` (anything is accepted and checked).
        expected: name -> shape of the current global state.
        pools: retrieval pools of the method (``"intra"``, ``"inter"``).
        max_norm: bound on each array's L2 norm.
        pattern_usage_required: pools whose pattern-usage table must be sent (the
            alignment compares retrieval profiles: ``align-on = usage``).
        max_uses_per_example: ``local-epochs x kappa``: a sample selects at most ``kappa``
            prompts of a pool at each of its passes, so a pool's counts add up to at most
            ``(num-examples + 1) x`` this (``num-examples`` is the samples seen over the
            epochs, divided by the epochs and rounded down). ``None``: no bound.
    """
    try:
        return _validate(update, expected, pools, max_norm, pattern_usage_required, max_uses_per_example)
    except Exception as exc:  # noqa: BLE001 - a validator must survive any malformed record
        return [f"malformed update: {type(exc).__name__}: {exc}"]


def _validate(
    update: Any,
    expected: Mapping[str, tuple[int, ...]],
    pools: Sequence[str],
    max_norm: float,
    pattern_usage_required: Sequence[str] = (),
    max_uses_per_example: int | None = None,
) -> list[str]:
    if not isinstance(update, ClientUpdate):
        return [f"update is a {type(update).__name__}, not a ClientUpdate"]
    reasons: list[str] = []
    num = update.num_examples
    valid_num = not isinstance(num, bool) and isinstance(num, (int, np.integer)) and num > 0
    if not valid_num:
        reasons.append(f"num-examples must be a positive integer, got {num!r}")
    state = update.state
    if not isinstance(state, Mapping):
        return reasons + [f"arrays must be a mapping of name to array, got {type(state).__name__}"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(map(str, set(state) - set(expected)))
    if missing:
        reasons.append(f"missing arrays: {', '.join(missing)}")
    if unexpected:
        reasons.append(f"unexpected arrays: {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(state)):
        value = state[name]
        if not isinstance(value, np.ndarray):
            reasons.append(f"array {name!r} is a {type(value).__name__}, not an ndarray")
            continue
        if value.dtype.kind != "f":
            reasons.append(f"array {name!r} has dtype {value.dtype}, expected a floating dtype")
            continue
        if tuple(value.shape) != tuple(expected[name]):
            reasons.append(f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(expected[name])}")
            continue
        # One BLAS pass for both checks: NaN and Inf propagate into the sum of squares, so
        # a finite sum proves every value finite (10x faster than isfinite + a float64
        # norm on ViLT-B/32-sized states); only a non-finite sum needs the exact checks.
        flat = np.ascontiguousarray(value).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            squares = float(np.dot(flat, flat))
        if math.isfinite(squares):
            norm = math.sqrt(squares)
        elif not np.isfinite(value).all():
            sent_as = f" (sent as {update.wire})" if update.wire != "float32" else ""
            reasons.append(f"array {name!r} contains NaN or Inf{sent_as}")
            continue
        else:  # finite values whose squares overflow the array's precision
            norm = array_norm(value)
        if norm > max_norm:
            reasons.append(f"array {name!r} has L2 norm {norm:.3g} above the bound {max_norm:.3g}")
    usage = update.usage
    if not isinstance(usage, Mapping):
        return reasons + [f"usage must map pool names to counts, got {type(usage).__name__}"]
    for pool in pools:
        counts = usage.get(pool)
        size_key = f"pools.{pool}.prompts"
        size = expected[size_key][0] if size_key in expected else None
        if counts is None:
            reasons.append(f"usage counts for pool {pool!r} are missing")
            continue
        counts = np.asarray(counts)
        if counts.ndim != 1 or (size is not None and counts.shape[0] != size):
            reasons.append(
                f"usage counts for pool {pool!r} have shape {counts.shape}, but the pool holds {size} prompts"
            )
            continue
        if counts.dtype.kind not in "iu" and not (
            counts.dtype.kind == "f" and np.all(np.isfinite(counts)) and np.all(counts == np.round(counts))
        ):
            reasons.append(f"usage counts for pool {pool!r} must be integers")
            continue
        if np.any(counts < 0) or counts.sum() <= 0:
            reasons.append(f"usage counts for pool {pool!r} must be non-negative with at least one use")
            continue
        if max_uses_per_example is not None and valid_num:
            most = (int(num) + 1) * max_uses_per_example
            total = int(counts.astype(np.float64).sum()) if counts.dtype.kind == "f" else int(counts.sum())
            if total > most:
                reasons.append(
                    f"usage counts for pool {pool!r} add up to {total}, more than {num} samples can make "
                    f"(at most {most}: (num-examples + 1) x local-epochs x kappa)"
                )
                continue
        table = update.pattern_usage.get(pool) if isinstance(update.pattern_usage, Mapping) else None
        if table is None and pool in pattern_usage_required:
            reasons.append(f"pattern usage for pool {pool!r} is missing (align-on = usage compares it)")
        if table is not None:
            table = np.asarray(table)
            if table.shape != (NUM_PATTERNS, counts.shape[0]) or table.dtype.kind not in "iu":
                reasons.append(
                    f"pattern usage for pool {pool!r} has shape {table.shape} and dtype {table.dtype}, "
                    f"expected integer counts of shape {(NUM_PATTERNS, counts.shape[0])}"
                )
            elif np.any(table < 0) or not np.array_equal(table.sum(axis=0), counts):
                reasons.append(f"pattern usage for pool {pool!r} does not add up to its usage counts")
    return reasons


@dataclasses.dataclass(frozen=True)
class AggregationSettings:
    """Server-side aggregation knobs.

    Attributes:
        max_prompts: bound on an aligned pool (``inter-pool-max``).
        sweeps: alignment sweeps.
        seed: alignment seed (seed it per round).
        inter_merge: ``"align"`` (content) or ``"position"`` for personalised pools.
        align_start: ``"warm"`` (from the slots' clusters) or ``"cold"`` (from scratch).
        align_on: what the alignment compares: ``"prompt"``, ``"delta"`` or ``"usage"``.
        align_theta_steps: Adam steps per theta-step of the alignment (``align_prompts``'s ``grad_steps``).
        pfpt_steps: ``pfpt``'s Adam schedule, ``"per-client"`` (PFPT's) or ``"per-sweep"``
            (:func:`~fedprime_core.method.pfpt.pfpt_aggregate`).
    """

    max_prompts: int = 100
    sweeps: int = 5
    seed: int = 0
    inter_merge: str = "align"
    align_start: str = "warm"
    align_on: str = "prompt"
    align_theta_steps: int = 50
    pfpt_steps: str = "per-client"


@dataclasses.dataclass(frozen=True)
class RoundAggregate:
    """The outcome of :func:`aggregate_round`.

    Attributes:
        state: the new global state: FedAvg of the shared arrays plus every pool's global
            prompts and keys (for a personalised pool: all its cluster centres).
        inter_pool: the new personalised inter pool with every client's slots (``None``
            for methods without one).
        report: per-pool sizes, alignment objective, timings, ready to be logged as metrics.
    """

    state: dict[str, np.ndarray]
    inter_pool: InterPool | None
    report: dict[str, Any]


def aggregate_round(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: MethodSpec,
    settings: AggregationSettings = AggregationSettings(),
    inter_pool: InterPool | None = None,
    inter_init: str = "shared",
) -> RoundAggregate:
    """Aggregate one round of (already validated) client updates.

    * Personalised pools (``spec.personalised_pools``: FedPrime's inter pool): every
      client's trained prompts are aligned on content with the clusters its slots held,
      usage-weighted, and each client gets its new slots
      (:func:`~fedprime_core.method.interpool.aggregate_inter_pool`); the global pool is the set of
      cluster centres. ``settings.inter_merge="position"`` merges slot ``p`` with slot ``p``.
    * Other aligned pools (PFPT): every client's rows at the union of the indices any
      client used are aggregated by :func:`~fedprime_core.method.pfpt.aggregate_pfpt_pool`; the new
      pool is every centroid some client uses (bounded by ``settings.max_prompts``), the
      same for every client.
    * Everything else (intra pool, keys, query maps, pooler, head, missing-aware prompts):
      FedAvg weighted by sample counts.
    * ``centralized-p``: the single owner's state is taken as is.

    Args:
        global_state: the global state of the round (a personalised pool's entries are
            its global centres; clients trained their own ``tau`` slots of it).
        updates: at least one valid update.
        spec: the method.
        settings: alignment bound, sweeps, seed (seed it per round) and merge mode.
        inter_pool: the personalised inter pool the clients' slots were assigned from
            (required when ``spec.personalised_pools`` is not empty).
        inter_init: how new clients' inter pools started (``"shared"`` / ``"independent"``,
            :func:`~fedprime_core.method.interpool.assign_slots`).

    Returns:
        :class:`RoundAggregate`.
    """
    if not updates:
        raise ValueError("aggregate_round needs at least one update")
    # Replies arrive in whatever order the clients finish; the alignment's sweeps and the
    # float sums depend on the order, so a fixed seed gives one result only in a fixed order.
    updates = sorted(updates, key=lambda u: client_order(u.client_id))
    report: dict[str, Any] = {}
    weights = [float(u.num_examples) for u in updates]
    if spec.centralized:
        new_state = {k: np.asarray(v, dtype=np.float32).copy() for k, v in updates[0].state.items()}
        report["aggregation-seconds"] = 0.0
        return RoundAggregate(new_state, None, report)
    if spec.personalised_pools and inter_pool is None:
        raise ValueError(f"method {spec.name!r} keeps personal inter pools: pass the round's inter_pool")
    start = time.perf_counter()
    aligned_names = {f"pools.{p}.{part}" for p in spec.aligned_pools for part in ("prompts", "keys")}
    averaged = [name for name in global_state if name not in aligned_names]
    new_state = fedavg([u.state for u in updates], weights, names=averaged)
    new_pool = None
    for pool in spec.personalised_pools:
        new_pool, pool_report = aggregate_inter_pool(
            inter_pool,
            [
                InterUpdate(
                    client=u.client_id,
                    prompts=np.asarray(u.state[f"pools.{pool}.prompts"]),
                    keys=np.asarray(u.state[f"pools.{pool}.keys"]),
                    usage=np.asarray(u.usage[pool]),
                    pattern_usage=u.pattern_usage.get(pool),
                )
                for u in updates
            ],
            mode=settings.inter_merge,
            max_size=settings.max_prompts,
            sweeps=settings.sweeps,
            seed=settings.seed,
            align_start=settings.align_start,
            align_on=settings.align_on,
            theta_steps=settings.align_theta_steps,
            init=inter_init,
        )
        new_state[f"pools.{pool}.prompts"] = new_pool.prompts.copy()
        new_state[f"pools.{pool}.keys"] = new_pool.keys.copy()
        report.update(pool_report)
    for pool in spec.aligned_pools:
        if pool in spec.personalised_pools:
            continue
        # PFPT's protocol: union of used rows from every client (fedprime_core.method.pfpt)
        prompts_key = f"pools.{pool}.prompts"
        new_state[prompts_key], pfpt_report = aggregate_pfpt_pool(
            [np.asarray(u.state[prompts_key]) for u in updates],
            [np.asarray(u.usage[pool]) for u in updates],
            max_prompts=settings.max_prompts,
            n_sweeps=settings.sweeps,
            seed=settings.seed,
            schedule=settings.pfpt_steps,
        )
        report.update({f"{pool}-{key}": value for key, value in pfpt_report.items()})
    for pool in spec.pools:
        if pool not in spec.aligned_pools:
            report[f"{pool}-pool-size"] = int(np.shape(new_state[f"pools.{pool}.prompts"])[0])
    report["aggregation-seconds"] = time.perf_counter() - start
    return RoundAggregate(new_state, new_pool, report)


class GlobalState:
    """The server's side of a federation: the global arrays and every client's personal inter pool.

    What a Flower strategy (or any other driver: a benchmark, a notebook) keeps between
    rounds. For methods without personal pools it is just the global arrays; for FedPrime's
    protocol it also holds the :class:`~fedprime_core.method.interpool.InterPool`, hands each
    client its own slots (:meth:`client_arrays`) and merges the replies (:meth:`aggregate`).

    Args:
        spec: the method.
        state: the global arrays (a fresh run's initial state, or a checkpoint's).
        inter_pool: a checkpoint's personal pools; a fresh run starts them from ``state``.
        inter_merge: ``"align"`` or ``"position"`` (how slots are given and merged).
        inter_init: ``"shared"`` (a new client starts from the most popular centres) or
            ``"independent"`` (from seeded prompts of its own).
        seed: the run seed (a client's own initial prompts are drawn from it and its id).
    """

    def __init__(
        self,
        spec: MethodSpec,
        state: Mapping[str, np.ndarray],
        inter_pool: InterPool | None = None,
        inter_merge: str = "align",
        inter_init: str = "shared",
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.inter_merge = inter_merge
        self.inter_init = inter_init
        self.seed = seed
        self.arrays: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        self.inter_pool: InterPool | None = None
        if spec.personalised_pools:
            self.inter_pool = inter_pool or InterPool.initial(
                self.arrays["pools.inter.prompts"], self.arrays["pools.inter.keys"]
            )
            self.arrays["pools.inter.prompts"] = self.inter_pool.prompts.copy()
            self.arrays["pools.inter.keys"] = self.inter_pool.keys.copy()

    @property
    def personal(self) -> bool:
        """Whether clients get their own inter pool (one payload per client)."""
        return self.inter_pool is not None

    def client_arrays(self, client: str) -> dict[str, np.ndarray]:
        """The arrays ``client`` trains or evaluates this round (its slots are recorded)."""
        if self.inter_pool is None:
            return self.arrays
        self.inter_pool, slots = assign_slots(self.inter_pool, client, self.inter_merge, self.inter_init, self.seed)
        prompts, keys = self.inter_pool.client_arrays(slots)
        return {**self.arrays, "pools.inter.prompts": prompts, "pools.inter.keys": keys}

    def top_tau_arrays(self) -> dict[str, np.ndarray] | None:
        """The global arrays with only the ``tau`` most popular centres of the personal inter pool.

        What a new client starts from (:func:`~fedprime_core.method.interpool.assign_slots`), and the
        same size under both merges, so the server can compare ``align`` and ``position`` on pools
        of equal size: the whole pool of centres grows under ``align`` and does not under
        ``position``. ``None`` when that is the whole global state: no personal pool, or a pool
        of at most ``tau`` centres.
        """
        pool = self.inter_pool
        if pool is None or pool.size <= pool.tau:
            return None
        prompts, keys = pool.client_arrays(pool.most_popular(pool.tau))
        return {**self.arrays, "pools.inter.prompts": prompts, "pools.inter.keys": keys}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes every client reply must have (a personal inter pool holds ``tau`` prompts)."""
        shapes = {name: value.shape for name, value in self.arrays.items()}
        if self.inter_pool is not None:
            tau = self.inter_pool.tau
            shapes["pools.inter.prompts"] = (tau, *self.inter_pool.prompts.shape[1:])
            shapes["pools.inter.keys"] = (tau, self.inter_pool.keys.shape[1])
        return shapes

    def aggregate(self, updates: Sequence[ClientUpdate], settings: AggregationSettings) -> dict[str, Any]:
        """Merge one round of validated updates into the global state; returns the round's report."""
        outcome = aggregate_round(
            self.arrays, updates, self.spec, settings, inter_pool=self.inter_pool, inter_init=self.inter_init
        )
        self.arrays = outcome.state
        if outcome.inter_pool is not None:
            self.inter_pool = outcome.inter_pool
        return outcome.report

    def record(self) -> dict[str, Any] | None:
        """JSON-able bookkeeping of the personal pools, for a checkpoint (``None`` without them)."""
        return self.inter_pool.to_record() if self.inter_pool is not None else None

    @classmethod
    def restore(
        cls,
        spec: MethodSpec,
        state: Mapping[str, np.ndarray],
        record: Mapping[str, Any] | None,
        inter_merge: str,
        inter_init: str = "shared",
        seed: int = 0,
    ) -> GlobalState:
        """The global state of a checkpoint: its arrays and :meth:`record`."""
        pool = None
        if record:
            pool = InterPool.from_record(record, state["pools.inter.prompts"], state["pools.inter.keys"])
        return cls(spec, state, pool, inter_merge, inter_init, seed)
