"""Server-side aggregators as pure functions on NumPy arrays.

* :func:`fedavg`: sample-weighted average of named arrays (intra pool, keys, query maps,
  pooler, head).
* :func:`align_prompts`: FedPrime's clustering-alignment of inter-client prompts.

PFPT's probabilistic prompt aggregation is not this engine: it lives in
:mod:`fedprime_core.method.pfpt` (centroids optimised jointly with both networks, PFPT's
initialisation and output rule).

Alignment model
---------------
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
   members (the exact maximiser of the likelihood term; the weights are per prompt, e.g.
   how often a client retrieved it this round, or a client's sample count, so a cluster
   holding one prompt of every client is FedAvg of aligned prompts);
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
* The engine's other popularity option (``align_prompts(..., popularity="empirical")``)
  is PFNM's (Yurochkin et al., 2019) Indian-buffet rule, not PFPT's: a cluster's odds are
  the empirical ``m_q / (n - m_q)`` of the other clients already in it (``U = m_q / n``)
  instead of a learned function of the centre. It stays available for ``fed-inter`` /
  ``fedprime`` experiments where a count-based popularity is wanted. PFPT itself learns
  its popularity with a network of the centre (:mod:`fedprime_core.method.pfpt`).
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
        source_labels: ``(K,)`` for each returned cluster, the ``init_assignments`` label
            it was warm-started as, or ``-1`` for a cluster opened during the alignment
            (every cluster is ``-1`` without ``init_assignments``).
        weights: ``(K,)`` total member weight of each cluster, in the units of the weights given.
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
    source_labels: np.ndarray
    weights: np.ndarray
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


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Validated inputs of one alignment, in float64.

    Attributes:
        prompts: per client ``(m_t, D)``.
        weights: per client ``(m_t,)`` positive weight of each prompt.
        keys: per client ``(m_t, Dk)`` or ``None``.
        init: per client ``(m_t,)`` distinct warm-start labels, or ``None``.
        features: per client ``(m_t, F)`` what the clustering compares, or ``None`` (the prompts).
    """

    prompts: list[np.ndarray]
    weights: list[np.ndarray]
    keys: list[np.ndarray] | None
    init: list[np.ndarray] | None
    features: list[np.ndarray] | None = None

    @property
    def matched(self) -> list[np.ndarray]:
        """What the clustering compares: the features when given, else the prompts."""
        return self.features if self.features is not None else self.prompts


def _check_inputs(
    client_prompts: Sequence[np.ndarray],
    client_weights: Sequence[float] | None,
    client_keys: Sequence[np.ndarray] | None,
    init_assignments: Sequence[np.ndarray] | None,
    prompt_weights: Sequence[np.ndarray] | None = None,
    client_features: Sequence[np.ndarray] | None = None,
) -> _Inputs:
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
    if prompt_weights is None:
        row_weights = [np.full(p.shape[0], w) for p, w in zip(prompts, weights)]
    else:
        row_weights = [np.asarray(w, dtype=np.float64) for w in prompt_weights]
        if len(row_weights) != n or any(w.shape != (p.shape[0],) for w, p in zip(row_weights, prompts)):
            raise ValueError("prompt_weights must hold one (m_t,) array per client, row-aligned with its prompts")
        if any(not np.isfinite(w).all() or np.any(w <= 0) for w in row_weights):
            raise ValueError("prompt_weights must be positive, finite numbers")
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
            placed = a[a >= 0]
            if np.any(a < -1) or len(np.unique(placed)) != len(placed):
                raise ValueError(
                    f"init_assignments of client {i} must be distinct non-negative indices (-1: no warm start)"
                )
    features = None
    if client_features is not None:
        features = [np.asarray(f, dtype=np.float64) for f in client_features]
        if len(features) != n or any(f.ndim != 2 or f.shape[0] != p.shape[0] for f, p in zip(features, prompts)):
            raise ValueError("client_features must hold one (m_t, F) array per client, row-aligned with its prompts")
        if len({f.shape[1] for f in features}) != 1:
            raise ValueError("every client's features must have the same width")
        if any(not np.isfinite(f).all() for f in features):
            raise ValueError("client_features contain NaN or Inf")
    return _Inputs(prompts, row_weights, keys, init, features)


class _ClusterState:
    """Cluster slots with running weighted sums, for O(1) add/remove of members.

    Slots ``0 .. reserved-1`` hold the warm-start clusters (slot = label); clusters opened
    during the alignment only take slots from ``reserved`` on, so a warm-start label is
    never reused for a different cluster.
    """

    def __init__(self, capacity: int, dim: int, reserved: int = 0) -> None:
        self.reserved = reserved
        self.sums = np.zeros((capacity, dim))
        self.weight = np.zeros(capacity)
        self.members = np.zeros(capacity, dtype=np.int64)
        self.scale = np.ones((capacity, dim))
        self.logit_pop = np.zeros(capacity)

    def add(self, slots: np.ndarray, z: np.ndarray, w: np.ndarray, sign: float = 1.0) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) one client's prompts ``z`` ``(m, D)`` of weights ``w`` ``(m,)``."""
        self.sums[slots] += sign * w[:, None] * z
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
        return np.flatnonzero(self.members[self.reserved :] == 0)[:count] + self.reserved


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


class ClusterAlignment:
    """The alternating optimisation of the module docstring, one step per method.

    Prompts are standardised once (global mean, one RMS scale); the cluster state holds
    running weighted sums so that moving one client's prompts costs ``O(m_t D)``. A run is
    :meth:`initial_assignment`, then :meth:`sweep` (alpha-step for every client in a seeded
    order, then :meth:`theta_step`) until a sweep changes nothing or ``n_sweeps`` are done,
    then :meth:`result`. :func:`align_prompts` does exactly that.

    Args:
        inputs: validated prompts, per-prompt weights, keys and warm-start labels.
        popularity: ``"learned"`` (the popularity net ``U(theta; zeta)``) or
            ``"empirical"`` (the PFNM-style rate of the other clients using a cluster).
        hidden, lr, grad_steps, min_scale: the nets' width, Adam step, steps per
            theta-step and the scale's lower bound (standardised units).
        seed: client order and net initialisation.
    """

    def __init__(
        self,
        inputs: _Inputs,
        *,
        popularity: str,
        hidden: int,
        lr: float,
        grad_steps: int,
        min_scale: float,
        seed: int,
    ) -> None:
        self.inputs = inputs
        self.n = len(inputs.prompts)
        self.grad_steps = grad_steps
        if popularity not in ("learned", "empirical"):
            raise ValueError(f"popularity must be 'learned' or 'empirical', got {popularity!r}")
        self.rng = np.random.default_rng(seed)
        stacked = np.concatenate(inputs.matched, axis=0)
        self.offset = stacked.mean(axis=0)
        self.spread = float(np.sqrt(np.mean((stacked - self.offset) ** 2))) or 1.0
        self.z = [(p - self.offset) / self.spread for p in inputs.matched]
        self.mean_weight = float(np.concatenate(inputs.weights).mean())
        self.w = [w / self.mean_weight for w in inputs.weights]
        self.dim = stacked.shape[1]
        self.reserved = max((int(a.max()) + 1 for a in inputs.init if a.size), default=0) if inputs.init else 0
        self.capacity = stacked.shape[0] + self.reserved
        with torch.random.fork_rng(devices=[]):  # seeded net init without touching global RNG state
            torch.manual_seed(seed)
            self.scale_net = _ScaleNet(self.dim, hidden, min_scale)
            self.pop_net = _PopularityNet(self.dim, hidden) if popularity == "learned" else None
        params = list(self.scale_net.parameters()) + (list(self.pop_net.parameters()) if self.pop_net else [])
        self.optimiser = torch.optim.Adam(params, lr=lr)
        self.state = _ClusterState(self.capacity, self.dim, self.reserved)
        self.assign = [np.full(p.shape[0], -1, dtype=np.int64) for p in inputs.prompts]
        self.hungarian_seconds = 0.0

    # -- the nets at the current centres ------------------------------------------------
    def refresh_nets(self, slots: np.ndarray) -> None:
        """Evaluate the scale (and a learned popularity) at the current centres of ``slots``."""
        if slots.size == 0:
            return
        with torch.no_grad():
            centres = torch.from_numpy(self.state.centres(slots).astype(np.float32))
            self.state.scale[slots] = self.scale_net(centres).numpy()
            if self.pop_net is not None:
                self.state.logit_pop[slots] = _logit(self.pop_net(centres).numpy())

    def popularity_logit(self, slots: np.ndarray) -> np.ndarray:
        """``logit U`` of the clusters in ``slots`` as seen by the client being assigned."""
        if self.pop_net is not None:
            return self.state.logit_pop[slots]
        others = self.state.members[slots]  # clients other than the one being assigned
        return np.log(others) - np.log(np.maximum(self.n - others, 1))

    # -- alpha-step ---------------------------------------------------------------------
    def initial_assignment(self) -> None:
        """Warm start from the given labels, or one sequential pass from scratch.

        Prompts labelled ``-1`` have no warm start: once the labelled ones are placed, each
        client holding such a prompt is assigned by the Hungarian step (seeded order).
        """
        if self.inputs.init is not None:
            for t, labels in enumerate(self.inputs.init):
                placed = labels >= 0
                self.assign[t] = labels.copy()
                self.state.add(labels[placed], self.z[t][placed], self.w[t][placed])
            self.refresh_nets(self.state.active())
            unplaced = {t for t, labels in enumerate(self.inputs.init) if np.any(labels < 0)}
            if unplaced:
                for t in self.rng.permutation(self.n):
                    if int(t) in unplaced:
                        self.assign_client(int(t))
        else:
            for t in self.rng.permutation(self.n):
                self.assign_client(int(t))

    def assign_client(self, t: int) -> None:
        """Re-assign client ``t``'s prompts by the Hungarian algorithm (maximising the gain).

        Columns: every existing cluster (Gaussian log-likelihood under its centre and scale
        plus its popularity logit) and one "new cluster" column per prompt (prior-predictive
        likelihood plus the popularity of a one-client cluster).
        """
        z, w = self.z[t], self.w[t]
        m = z.shape[0]
        if m == 0:
            return
        state, own = self.state, self.assign[t]
        placed = own >= 0
        if placed.any():
            state.add(own[placed], z[placed], w[placed], sign=-1.0)
        slots = state.active()
        mean_var = np.mean(state.scale[slots] ** 2, axis=0) if slots.size else np.ones(self.dim)
        new_gain = _prior_loglik(z, mean_var) + float(_logit(1.0 / max(self.n, 2)))
        new_block = np.full((m, m), _INFEASIBLE)
        np.fill_diagonal(new_block, new_gain)
        if slots.size:
            gain = _gaussian_loglik(z, state.centres(slots), state.scale[slots]) + self.popularity_logit(slots)
            gain = np.concatenate([gain, new_block], axis=1)
        else:
            gain = new_block
        tick = time.perf_counter()
        rows, cols = linear_sum_assignment(gain, maximize=True)
        self.hungarian_seconds += time.perf_counter() - tick
        chosen = np.empty(m, dtype=np.int64)
        existing = cols < slots.size
        chosen[rows[existing]] = slots[cols[existing]]
        fresh_rows = rows[~existing]
        if fresh_rows.size:
            # A prompt that was alone in its cluster and stays alone keeps its cluster (and label).
            previous = np.where(placed, own, -1)[fresh_rows]
            stays = previous >= 0
            stays[stays] = state.members[previous[stays]] == 0
            chosen[fresh_rows[stays]] = previous[stays]
            # The kept clusters are empty until ``state.add`` below: never hand them out again.
            opening = int((~stays).sum())
            free = state.free_slots(opening + int(stays.sum()))
            chosen[fresh_rows[~stays]] = free[~np.isin(free, previous[stays])][:opening]
        state.add(chosen, z, w)
        if fresh_rows.size:
            self.refresh_nets(chosen[fresh_rows])
        self.assign[t] = chosen

    # -- theta-step ---------------------------------------------------------------------
    def theta_step(self) -> float:
        """Adam steps on the scale / popularity nets at the current centres; returns ``J``.

        Centres are the weighted member means (the exact maximiser of the likelihood term).
        The likelihood is evaluated from per-cluster sufficient statistics (residual sum of
        squares per dimension), so a step costs ``O(K D)``, not ``O(N D)``.
        """
        state, n, dim = self.state, self.n, self.dim
        slots = state.active()
        centres_np = state.centres(slots)
        position = np.full(self.capacity, -1, dtype=np.int64)
        position[slots] = np.arange(slots.size)
        rss = np.zeros_like(centres_np)
        for t, labels in enumerate(self.assign):
            rows = position[labels]  # distinct within a client, so plain fancy-index accumulation is exact
            rss[rows] += (self.z[t] - centres_np[rows]) ** 2
        centres = torch.from_numpy(centres_np.astype(np.float32))
        rss_t = torch.from_numpy(rss.astype(np.float32))
        counts = torch.from_numpy(state.members[slots].astype(np.float32))
        shared = counts >= 2  # singletons carry no information about spread
        constant = -0.5 * float(counts.sum()) * dim * _LOG_2PI
        pop_net = self.pop_net

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            scale = self.scale_net(centres)
            per_cluster = -0.5 * (rss_t / scale.pow(2)).sum(1) - counts * torch.log(scale).sum(1)
            u = pop_net(centres) if pop_net is not None else (counts / n).clamp(1e-4, 1 - 1e-4)
            pop_term = (counts * torch.log(u) + (n - counts) * torch.log1p(-u)).sum()
            fit = per_cluster[shared].sum() + pop_term
            return per_cluster.sum() + pop_term + constant, fit

        if bool(shared.any()) or pop_net is not None:
            for _ in range(self.grad_steps):
                self.optimiser.zero_grad()
                _, fit = objective()
                (-fit).backward()
                self.optimiser.step()
        with torch.no_grad():
            value, _ = objective()
        self.refresh_nets(slots)
        return float(value)

    def sweep(self) -> bool:
        """One alpha-step per client (seeded order) and a theta-step; True if any assignment changed."""
        before = [a.copy() for a in self.assign]
        for t in self.rng.permutation(self.n):
            self.assign_client(int(t))
        return not all(np.array_equal(a, b) for a, b in zip(self.assign, before))

    # -- output -------------------------------------------------------------------------
    def result(self, max_prompts: int | None, trace: Sequence[float], started: float) -> AlignmentResult:
        """Clusters ordered by popularity (clients, then weight), bounded by ``max_prompts``."""
        state = self.state
        slots = state.active()
        slots = slots[np.lexsort((-state.weight[slots], -state.members[slots]))]
        num_dropped = 0
        if max_prompts is not None and slots.size > max_prompts:
            num_dropped = int(slots.size - max_prompts)
            slots = slots[:max_prompts]
        new_index = np.full(self.capacity, -1, dtype=np.int64)
        new_index[slots] = np.arange(slots.size)
        assignments = [new_index[a] for a in self.assign]

        def merged(values: list[np.ndarray]) -> np.ndarray:
            """Weighted member means of ``values`` (per client ``(m_t, X)``) under the final assignment."""
            sums = np.zeros((slots.size, values[0].shape[1]))
            for t, labels in enumerate(assignments):
                kept = labels >= 0
                np.add.at(sums, labels[kept], self.w[t][kept, None] * values[t][kept])
            return sums / state.weight[slots, None]

        merged_keys = None if self.inputs.keys is None else merged(self.inputs.keys)
        if self.inputs.features is None:
            centres = state.centres(slots) * self.spread + self.offset
        else:  # clustered on features: the centres are the members' prompts, merged alike
            centres = merged(self.inputs.prompts)
        if self.pop_net is not None:
            with torch.no_grad():
                pop = self.pop_net(torch.from_numpy(state.centres(slots).astype(np.float32))).numpy()
        else:
            pop = np.clip(state.members[slots] / self.n, 1e-4, 1 - 1e-4)
        return AlignmentResult(
            centres=centres.astype(np.float32),
            keys=None if merged_keys is None else merged_keys.astype(np.float32),
            assignments=assignments,
            cluster_sizes=state.members[slots].copy(),
            popularity=np.asarray(pop, dtype=np.float64),
            objective=trace[-1],
            objective_trace=tuple(trace),
            source_labels=np.where(slots < self.reserved, slots, -1).astype(np.int64),
            weights=state.weight[slots] * self.mean_weight,
            num_dropped=num_dropped,
            hungarian_seconds=self.hungarian_seconds,
            total_seconds=time.perf_counter() - started,
        )

    def run(self, n_sweeps: int, max_prompts: int | None, started: float) -> AlignmentResult:
        """Initial assignment, then sweeps until a fixed point of the alpha-step or ``n_sweeps``."""
        self.initial_assignment()
        trace = [self.theta_step()]
        for _ in range(n_sweeps):
            changed = self.sweep()
            trace.append(self.theta_step())
            if not changed:
                break  # a fixed point of the alpha-step: further sweeps change nothing
        return self.result(max_prompts, trace, started)


def align_prompts(
    client_prompts: Sequence[np.ndarray],
    client_weights: Sequence[float] | None = None,
    *,
    client_keys: Sequence[np.ndarray] | None = None,
    init_assignments: Sequence[np.ndarray] | None = None,
    prompt_weights: Sequence[np.ndarray] | None = None,
    client_features: Sequence[np.ndarray] | None = None,
    max_prompts: int | None = None,
    n_sweeps: int = 5,
    popularity: str = "learned",
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
        init_assignments: per client, ``(m_t,)`` label of the cluster each local prompt
            starts in (warm start: the global prompt it was initialised from this round).
            Labels are any distinct non-negative integers per client; clusters opened
            during the alignment never reuse one (see ``AlignmentResult.source_labels``).
            ``-1`` marks a prompt without a warm start (placed by the Hungarian step after
            the labelled ones). Without it clusters are built from scratch.
        prompt_weights: per client, ``(m_t,)`` positive weight of each prompt (e.g. how
            often it was retrieved this round); overrides ``client_weights``.
        client_features: per client, ``(m_t, F)`` what the clustering compares instead of
            the prompts themselves (e.g. each prompt's change this round, or its retrieval
            profile over missing patterns), row-aligned with the prompts. The assignment is
            made on the features; the returned centres (and keys) are the weighted means of
            the member prompts (keys) under that assignment.
        max_prompts: bound on the number of returned centres (least popular dropped).
        n_sweeps: alternating-optimisation sweeps (reference: 5).
        popularity: ``"learned"`` (FedPrime's popularity net) or ``"empirical"`` (PFNM's
            count-based rule; see the module docstring).
        hidden: width of the scale and popularity nets (reference: 128).
        lr: Adam learning rate of the nets.
        grad_steps: Adam steps per theta-step.
        min_scale: lower bound of the learned scale, in standardised units.
        seed: makes client order and net initialisation deterministic.

    Returns:
        :class:`AlignmentResult`.
    """
    started = time.perf_counter()
    inputs = _check_inputs(
        client_prompts, client_weights, client_keys, init_assignments, prompt_weights, client_features
    )
    engine = ClusterAlignment(
        inputs, popularity=popularity, hidden=hidden, lr=lr, grad_steps=grad_steps, min_scale=min_scale, seed=seed
    )
    return engine.run(n_sweeps, max_prompts, started)
