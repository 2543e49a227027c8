"""Server-side aggregators as pure functions on NumPy arrays.

* :func:`fedavg`: sample-weighted average of named arrays (intra pool, keys, query maps,
  pooler, head).
* :func:`align_prompts`: FedPrime's clustering-alignment of inter-client prompts.

PFPT's probabilistic prompt aggregation is not this engine: it lives in
:mod:`fedprime_core.pfpt` (centroids optimised jointly with both networks, PFPT's
initialisation and output rule).

Alignment model (ALGORITHM.md section 3)
----------------------------------------
Client ``t`` sends ``m_t`` prompts ``p_t^1..p_t^{m_t}`` (only those it actually used).
Each prompt is assigned to one cluster ``q`` (``alpha_t^{p,q} in {0,1}``); two prompts of
one client never share a cluster. Cluster centres ``theta_q`` become the new global prompts.
The objective maximised is::

    J = sum_{t,p,q} alpha_t^{pq} log N(p_t^p | theta_q, diag sigma(theta_q)^2)
      + sum_{t,q} [ a_tq log U(theta_q) + (1 - a_tq) log(1 - U(theta_q)) ]

with ``a_tq = sum_p alpha_t^{pq}`` (client ``t`` uses cluster ``q``), a learned
per-dimension scale ``sigma(.; gamma)`` (net ``D -> 128 -> D``, sigmoid) and a popularity
``U(.; zeta)`` (net ``D -> 128 -> 1``, sigmoid) favouring clusters that many clients use.
Because ``a_tq`` is 0/1, the popularity part of one client's assignment is, up to a
constant, ``sum_{q used} logit U(theta_q)``: this is the per-pair popularity cost.

Alternating optimisation:

1. **theta-step** (``alpha`` fixed): ``theta_q`` is the weight-averaged mean of its
   members (the exact maximiser of the likelihood term; client sample counts are the
   weights, so a cluster holding one prompt of every client is FedAvg of aligned prompts);
   the scale and popularity nets take Adam steps on ``J``.
2. **alpha-step** (``theta, gamma, zeta`` fixed): for each client in turn (seeded order),
   its prompts are removed from their clusters and re-assigned by the Hungarian
   algorithm (``scipy.optimize.linear_sum_assignment``, maximising) over every existing
   cluster plus one "new cluster" column per prompt, priced by the prior-predictive
   likelihood ``N(p | 0, 1 + sigma^2)`` and the popularity of a one-client cluster.
   Costs are computed for all candidate centres at once (matrix products), never in a
   Python loop over centres.

Prompts are standardised (global mean and RMS scale) before clustering, so the result does
not depend on the prompts' units; centres are returned in the original units.

Popularity: learned, or PFNM-style empirical
--------------------------------------------
* FedPrime (:func:`align_prompts`) uses the learned popularity net ``U(theta; zeta)`` and
  warm-starts from the previous global pool: a client's prompt starts in the cluster of the
  global prompt it was initialised from this round (``init_assignments``), so a round
  costs a few sweeps over ``~|pool|`` candidate centres (PFNM's bounded candidate set).
  5 sweeps by default.
* The engine's other popularity option (``_run_alignment(..., popularity="empirical")``)
  is PFNM's (Yurochkin et al., 2019) Indian-buffet rule, not PFPT's: a cluster's odds are
  the empirical ``m_q / (n - m_q)`` of the other clients already in it (``U = m_q / n``)
  instead of a learned function of the centre. It stays available for ``fed-inter`` /
  ``fedprime`` experiments where a count-based popularity is wanted. PFPT itself learns
  its popularity with a network of the centre (:mod:`fedprime_core.pfpt`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

_LOG_2PI = float(np.log(2.0 * np.pi))
_INFEASIBLE = -1.0e30


# ---------------------------------------------------------------------------------------
# FedAvg
# ---------------------------------------------------------------------------------------
def fedavg(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Weighted average of named arrays.

    Args:
        states: one ``name -> array`` mapping per client; arrays of one name share a shape.
        weights: non-negative weight per client (sample counts), not all zero.
        names: the names to average (default: all names of the first state).

    Returns:
        ``name -> float32 array`` (accumulated in float64).

    Raises:
        ValueError: on empty input, bad weights, or a missing name / shape mismatch.
    """
    if not states:
        raise ValueError("fedavg needs at least one state")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(states),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(
            f"fedavg weights must be {len(states)} non-negative numbers with a positive sum, got {weights!r}"
        )
    w = w / w.sum()
    names = list(states[0]) if names is None else list(names)
    out: dict[str, np.ndarray] = {}
    for name in names:
        arrays = []
        for i, state in enumerate(states):
            if name not in state:
                raise ValueError(f"fedavg: client {i} has no array {name!r}")
            arrays.append(np.asarray(state[name]))
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"fedavg: array {name!r} has different shapes across clients: {sorted(shapes)}")
        acc = np.zeros(arrays[0].shape, dtype=np.float64)
        for wi, a in zip(w, arrays):
            acc += wi * a
        out[name] = acc.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    """Output of :func:`align_prompts`.

    Attributes:
        centres: ``(K, D)`` merged prompts (new global pool), most popular first.
        keys: ``(K, Dk)`` merged keys (same assignment), or ``None`` if none were given.
        assignments: per client, ``(m_t,)`` cluster index of each of its prompts in
            ``[0, K)``, or ``-1`` if its cluster was dropped by ``max_prompts``.
        cluster_sizes: ``(K,)`` number of prompts (= clients) in each cluster.
        popularity: ``(K,)`` popularity ``U`` of each cluster in ``(0, 1)``.
        objective: final value of ``J`` (see module docstring).
        objective_trace: ``J`` after the initial assignment and after every sweep (sweeps
            stop early once a whole sweep leaves every assignment unchanged).
        num_dropped: clusters removed to respect ``max_prompts``.
        hungarian_seconds: wall time spent in ``linear_sum_assignment``.
        total_seconds: wall time of the whole call.
    """

    centres: np.ndarray
    keys: np.ndarray | None
    assignments: list[np.ndarray]
    cluster_sizes: np.ndarray
    popularity: np.ndarray
    objective: float
    objective_trace: tuple[float, ...]
    num_dropped: int
    hungarian_seconds: float
    total_seconds: float


class _ScaleNet(nn.Module):
    """Per-dimension scale ``sigma(theta) in [min_scale, 1]`` (standardised units)."""

    def __init__(self, dim: int, hidden: int, min_scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.min_scale = min_scale
        with torch.no_grad():  # start near 1: an uninformed scale equal to the prompts' spread
            self.net[2].weight.mul_(0.1)
            self.net[2].bias.fill_(3.0)

    def forward(self, centres: torch.Tensor) -> torch.Tensor:
        return self.min_scale + (1.0 - self.min_scale) * torch.sigmoid(self.net(centres))


class _PopularityNet(nn.Module):
    """Popularity ``U(theta) in (0, 1)``: the chance a client uses a cluster at ``theta``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, centres: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(centres)).squeeze(-1).clamp(1e-4, 1 - 1e-4)


def _check_inputs(
    client_prompts: Sequence[np.ndarray],
    client_weights: Sequence[float] | None,
    client_keys: Sequence[np.ndarray] | None,
    init_assignments: Sequence[np.ndarray] | None,
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None, list[np.ndarray] | None]:
    if len(client_prompts) == 0:
        raise ValueError("align_prompts needs at least one client")
    prompts = [np.asarray(p, dtype=np.float64) for p in client_prompts]
    dims = {p.shape[1] if p.ndim == 2 else None for p in prompts}
    if None in dims or len(dims) != 1:
        raise ValueError(
            f"every client's prompts must be a (m_t, D) array with one D; got shapes {[p.shape for p in prompts]}"
        )
    if sum(p.shape[0] for p in prompts) == 0:
        raise ValueError("align_prompts got no prompts at all")
    for i, p in enumerate(prompts):
        if not np.isfinite(p).all():
            raise ValueError(f"client {i}'s prompts contain NaN or Inf")
    n = len(prompts)
    weights = np.ones(n) if client_weights is None else np.asarray(client_weights, dtype=np.float64)
    if weights.shape != (n,) or not np.isfinite(weights).all() or np.any(weights <= 0):
        raise ValueError(f"client_weights must be {n} positive numbers, got {client_weights!r}")
    keys = None
    if client_keys is not None:
        keys = [np.asarray(k, dtype=np.float64) for k in client_keys]
        if len(keys) != n or any(k.ndim != 2 or k.shape[0] != p.shape[0] for k, p in zip(keys, prompts)):
            raise ValueError("client_keys must hold one (m_t, Dk) array per client, row-aligned with its prompts")
        if len({k.shape[1] for k in keys}) != 1:
            raise ValueError("every client's keys must have the same width")
    init = None
    if init_assignments is not None:
        init = [np.asarray(a, dtype=np.int64) for a in init_assignments]
        if len(init) != n or any(a.shape != (p.shape[0],) for a, p in zip(init, prompts)):
            raise ValueError("init_assignments must hold one (m_t,) index array per client")
        for i, a in enumerate(init):
            if np.any(a < 0) or len(np.unique(a)) != len(a):
                raise ValueError(f"init_assignments of client {i} must be distinct non-negative indices")
    return prompts, weights, keys, init


class _ClusterState:
    """Cluster slots with running weighted sums, for O(1) add/remove of members."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.sums = np.zeros((capacity, dim))
        self.weight = np.zeros(capacity)
        self.members = np.zeros(capacity, dtype=np.int64)
        self.scale = np.ones((capacity, dim))
        self.logit_pop = np.zeros(capacity)

    def add(self, slots: np.ndarray, z: np.ndarray, w: float, sign: float = 1.0) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) one client's prompts ``z`` from ``slots``."""
        self.sums[slots] += sign * w * z
        self.weight[slots] += sign * w
        self.members[slots] += int(sign)
        emptied = slots[self.members[slots] == 0]
        self.sums[emptied] = 0.0  # no floating-point residue in a reusable slot
        self.weight[emptied] = 0.0

    def active(self) -> np.ndarray:
        return np.flatnonzero(self.members > 0)

    def centres(self, slots: np.ndarray) -> np.ndarray:
        return self.sums[slots] / self.weight[slots, None]

    def free_slots(self, count: int) -> np.ndarray:
        return np.flatnonzero(self.members == 0)[:count]


def _gaussian_loglik(z: np.ndarray, centres: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``log N(z_i | centre_q, diag scale_q^2)`` for every pair: ``(m, K)``, vectorised.

    ``sum_d (z - c)^2 / s^2`` is expanded into matrix products so the cost is
    ``O(m K D)`` BLAS work with no loop over centres.
    """
    inv_var = 1.0 / scale**2  # (K, D)
    quad = (z**2) @ inv_var.T - 2.0 * z @ (centres * inv_var).T + np.sum(centres**2 * inv_var, axis=1)
    log_det = np.sum(np.log(scale), axis=1)  # (K,)
    return -0.5 * np.maximum(quad, 0.0) - log_det - 0.5 * z.shape[1] * _LOG_2PI


def _prior_loglik(z: np.ndarray, mean_var: np.ndarray) -> np.ndarray:
    """Prior-predictive log-likelihood of opening a new cluster at ``z``: ``(m,)``."""
    var = 1.0 + mean_var  # (D,)
    return -0.5 * np.sum(z**2 / var + np.log(var), axis=1) - 0.5 * z.shape[1] * _LOG_2PI


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _run_alignment(
    client_prompts: Sequence[np.ndarray],
    client_weights: Sequence[float] | None,
    *,
    client_keys: Sequence[np.ndarray] | None,
    init_assignments: Sequence[np.ndarray] | None,
    max_prompts: int | None,
    n_sweeps: int,
    popularity: str,
    hidden: int,
    lr: float,
    grad_steps: int,
    min_scale: float,
    seed: int,
) -> AlignmentResult:
    start = time.perf_counter()
    prompts, weights, keys, init = _check_inputs(client_prompts, client_weights, client_keys, init_assignments)
    n = len(prompts)
    rng = np.random.default_rng(seed)

    # Standardise: global mean and a single RMS scale (unit-free clustering).
    stacked = np.concatenate(prompts, axis=0)
    offset = stacked.mean(axis=0)
    spread = float(np.sqrt(np.mean((stacked - offset) ** 2))) or 1.0
    z_all = [(p - offset) / spread for p in prompts]
    w_norm = weights / weights.mean()
    dim = stacked.shape[1]
    capacity = stacked.shape[0] + (max(int(a.max()) + 1 for a in init if a.size) if init else 0)

    with torch.random.fork_rng(devices=[]):  # seeded net init without touching global RNG state
        torch.manual_seed(seed)
        scale_net = _ScaleNet(dim, hidden, min_scale)
        pop_net = _PopularityNet(dim, hidden) if popularity == "learned" else None
    params = list(scale_net.parameters()) + (list(pop_net.parameters()) if pop_net else [])
    optimiser = torch.optim.Adam(params, lr=lr)

    state = _ClusterState(capacity, dim)
    assign = [np.full(p.shape[0], -1, dtype=np.int64) for p in prompts]
    hungarian_seconds = 0.0

    def refresh_nets(slots: np.ndarray) -> None:
        """Evaluate scale (and learned popularity) at the current centres of ``slots``."""
        if slots.size == 0:
            return
        with torch.no_grad():
            centres = torch.from_numpy(state.centres(slots).astype(np.float32))
            state.scale[slots] = scale_net(centres).numpy()
            if pop_net is not None:
                state.logit_pop[slots] = _logit(pop_net(centres).numpy())

    def popularity_logit(slots: np.ndarray) -> np.ndarray:
        if pop_net is not None:
            return state.logit_pop[slots]
        others = state.members[slots]  # clients other than the one being assigned
        return np.log(others) - np.log(np.maximum(n - others, 1))

    def assign_client(t: int) -> None:
        nonlocal hungarian_seconds
        z, w = z_all[t], w_norm[t]
        m = z.shape[0]
        if m == 0:
            return
        own = assign[t]
        placed = own >= 0
        if placed.any():
            state.add(own[placed], z[placed], w, sign=-1.0)
        slots = state.active()
        new_gain = _prior_loglik(z, np.mean(state.scale[slots] ** 2, axis=0) if slots.size else np.ones(dim))
        new_gain = new_gain + float(_logit(1.0 / max(n, 2)))
        new_block = np.full((m, m), _INFEASIBLE)
        np.fill_diagonal(new_block, new_gain)
        if slots.size:
            gain = _gaussian_loglik(z, state.centres(slots), state.scale[slots]) + popularity_logit(slots)
            gain = np.concatenate([gain, new_block], axis=1)
        else:
            gain = new_block
        tick = time.perf_counter()
        rows, cols = linear_sum_assignment(gain, maximize=True)
        hungarian_seconds += time.perf_counter() - tick
        chosen = np.empty(m, dtype=np.int64)
        existing = cols < slots.size
        chosen[rows[existing]] = slots[cols[existing]]
        fresh_rows = rows[~existing]
        if fresh_rows.size:
            chosen[fresh_rows] = state.free_slots(fresh_rows.size)
        state.add(chosen, z, w)
        if fresh_rows.size:
            refresh_nets(chosen[fresh_rows])
        assign[t] = chosen

    def theta_step() -> float:
        """Adam steps on the scale / popularity nets at the current centres; returns J.

        The likelihood is evaluated from per-cluster sufficient statistics (residual sum
        of squares per dimension), so a step costs O(K D), not O(N D).
        """
        slots = state.active()
        centres_np = state.centres(slots)
        position = np.full(capacity, -1, dtype=np.int64)
        position[slots] = np.arange(slots.size)
        rss = np.zeros_like(centres_np)
        for t, a in enumerate(assign):
            rows = position[a]  # distinct within a client, so plain fancy-index accumulation is exact
            rss[rows] += (z_all[t] - centres_np[rows]) ** 2
        centres = torch.from_numpy(centres_np.astype(np.float32))
        rss_t = torch.from_numpy(rss.astype(np.float32))
        counts = torch.from_numpy(state.members[slots].astype(np.float32))
        shared = counts >= 2  # singletons carry no information about spread
        constant = -0.5 * float(counts.sum()) * dim * _LOG_2PI

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            scale = scale_net(centres)
            per_cluster = -0.5 * (rss_t / scale.pow(2)).sum(1) - counts * torch.log(scale).sum(1)
            u = pop_net(centres) if pop_net is not None else (counts / n).clamp(1e-4, 1 - 1e-4)
            pop_term = (counts * torch.log(u) + (n - counts) * torch.log1p(-u)).sum()
            fit = per_cluster[shared].sum() + pop_term
            return per_cluster.sum() + pop_term + constant, fit

        if bool(shared.any()) or pop_net is not None:
            for _ in range(grad_steps):
                optimiser.zero_grad()
                _, fit = objective()
                (-fit).backward()
                optimiser.step()
        with torch.no_grad():
            value, _ = objective()
        refresh_nets(slots)
        return float(value)

    # Initial assignment: warm start from positions, or one sequential pass from scratch.
    if init is not None:
        for t, a in enumerate(init):
            assign[t] = a.copy()
            state.add(a, z_all[t], w_norm[t])
        refresh_nets(state.active())
    else:
        for t in rng.permutation(n):
            assign_client(int(t))
    trace = [theta_step()]
    for _ in range(n_sweeps):
        before = [a.copy() for a in assign]
        for t in rng.permutation(n):
            assign_client(int(t))
        trace.append(theta_step())
        if all(np.array_equal(a, b) for a, b in zip(assign, before)):
            break  # a fixed point of the alpha-step: further sweeps change nothing

    # Output: clusters ordered by popularity (clients, then weight), bounded by max_prompts.
    slots = state.active()
    order = np.lexsort((-state.weight[slots], -state.members[slots]))
    slots = slots[order]
    num_dropped = 0
    if max_prompts is not None and slots.size > max_prompts:
        num_dropped = int(slots.size - max_prompts)
        slots = slots[:max_prompts]
    new_index = np.full(capacity, -1, dtype=np.int64)
    new_index[slots] = np.arange(slots.size)
    assignments = [new_index[a] for a in assign]
    centres = state.centres(slots) * spread + offset
    merged_keys = None
    if keys is not None:
        key_sums = np.zeros((slots.size, keys[0].shape[1]))
        for t, a in enumerate(assignments):
            kept = a >= 0
            np.add.at(key_sums, a[kept], w_norm[t] * keys[t][kept])
        merged_keys = key_sums / state.weight[slots, None]
    if pop_net is not None:
        with torch.no_grad():
            pop = pop_net(torch.from_numpy(state.centres(slots).astype(np.float32))).numpy()
    else:
        pop = np.clip(state.members[slots] / n, 1e-4, 1 - 1e-4)
    return AlignmentResult(
        centres=centres.astype(np.float32),
        keys=None if merged_keys is None else merged_keys.astype(np.float32),
        assignments=assignments,
        cluster_sizes=state.members[slots].copy(),
        popularity=np.asarray(pop, dtype=np.float64),
        objective=trace[-1],
        objective_trace=tuple(trace),
        num_dropped=num_dropped,
        hungarian_seconds=hungarian_seconds,
        total_seconds=time.perf_counter() - start,
    )


def align_prompts(
    client_prompts: Sequence[np.ndarray],
    client_weights: Sequence[float] | None = None,
    *,
    client_keys: Sequence[np.ndarray] | None = None,
    init_assignments: Sequence[np.ndarray] | None = None,
    max_prompts: int | None = None,
    n_sweeps: int = 5,
    hidden: int = 128,
    lr: float = 1e-2,
    grad_steps: int = 10,
    min_scale: float = 0.02,
    seed: int = 0,
) -> AlignmentResult:
    """FedPrime's clustering-alignment of inter-client prompts (see module docstring).

    Args:
        client_prompts: per client, ``(m_t, D)`` prompts it used this round (flattened
            ``length * d``).
        client_weights: per client, a positive weight (sample count); default equal.
        client_keys: per client, ``(m_t, Dk)`` keys row-aligned with its prompts; they are
            merged with the same assignment.
        init_assignments: per client, ``(m_t,)`` index of the global prompt each local
            prompt started from this round (warm start). Without it clusters are built
            from scratch.
        max_prompts: bound on the number of returned centres (least popular dropped).
        n_sweeps: alternating-optimisation sweeps (reference: 5).
        hidden: width of the scale and popularity nets (reference: 128).
        lr: Adam learning rate of the nets.
        grad_steps: Adam steps per theta-step.
        min_scale: lower bound of the learned scale, in standardised units.
        seed: makes client order and net initialisation deterministic.

    Returns:
        :class:`AlignmentResult`.
    """
    return _run_alignment(
        client_prompts,
        client_weights,
        client_keys=client_keys,
        init_assignments=init_assignments,
        max_prompts=max_prompts,
        n_sweeps=n_sweeps,
        popularity="learned",
        hidden=hidden,
        lr=lr,
        grad_steps=grad_steps,
        min_scale=min_scale,
        seed=seed,
    )
