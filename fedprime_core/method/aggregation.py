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
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..devices import single_thread

_LOG_2PI = float(np.log(2.0 * np.pi))
_INFEASIBLE = -1.0e30
#: Rows per block when a pass over all prompts is chunked (bounds the temporaries to ~25 MB at D = 768).
_BLOCK_ROWS = 4096
#: Rows per block of the fast solver's residual products (the block's squares, ~6 MB at D = 768, stay in
#: cache between the two products; the bounds allow for any summation order, :meth:`ClusterAlignment._rounding_bound`).
_PRODUCT_ROWS = 1024
#: The alignment's assignment solvers (see :func:`align_prompts`).
SOLVERS = ("fast", "dense")
_UNIT_ROUNDOFF = float(np.finfo(np.float64).eps) / 2.0
#: Below this many compared entries per prompt the fast solver computes every step's gains exactly.
_CACHE_MIN_DIM = 32
#: The fast solver's widened bounds (:meth:`ClusterAlignment.run_pass`): how far centres may move
#: (a share of the rows' typical distance to their nearest centre) and clusters' weights change.
_SLACK, _WEIGHT_SLACK = 0.1, 0.25
#: Most clients a batch of the fast solver bounds at once (:meth:`ClusterAlignment.run_pass`): its (rows x
#: clusters) bound arrays stay a few MB (2048 gave no fewer CPU seconds at 1,000 or 10,000 clients, within noise).
_MAX_BATCH = 512
#: Passes over fewer clients are not bounded a second time (re-bounding after a move costs little).
_WIDEN_MIN_CLIENTS = 16
#: Queues of at most this many no-op steps are applied client by client (:meth:`ClusterAlignment.flush`).
_FLUSH_ONE_BY_ONE = 16
#: Above this many targets :func:`_ordered_sums` adds in rounds instead of target by target.
_SEGMENT_LOOP_MAX = 256
#: Exact steps with at most this many clusters go straight to ``linear_sum_assignment`` (it
#: costs less than checking for a certified answer, :func:`_certified_choice`, and gives it).
_DIRECT_COLUMNS = 128


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
        hungarian_calls: client steps that solved a Hungarian problem (the others were
            settled from bounds, or had distinct, strict row maxima among more than
            ``_DIRECT_COLUMNS`` clusters: see :func:`_certified_choice`).
        client_steps: client steps (alpha-step re-assignments of one client) run.
        bounded_steps: client steps the fast solver settled from bounds, without computing
            the client's gains (:class:`ClusterAlignment`).
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
    hungarian_calls: int = 0
    client_steps: int = 0
    bounded_steps: int = 0


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
    """Validated inputs of one alignment, stacked over clients (client ``t`` holds rows ``bounds[t]:bounds[t+1]``).

    What the clustering compares (:attr:`matched_all`) is float64; prompts that are only
    merged at the end (when features are compared) and keys keep a float32 dtype if they
    came as float32 (widening is exact, so the merged means are the same as from float64).

    Attributes:
        bounds: ``(n + 1,)`` row offsets of the clients.
        prompts_all: ``(N, D)`` prompts of all clients.
        weights_all: ``(N,)`` positive weight of each prompt.
        keys_all: ``(N, Dk)`` keys, or ``None``.
        init_all: ``(N,)`` warm-start labels (distinct within a client, ``-1``: none), or ``None``.
        features_all: ``(N, F)`` float64 what the clustering compares, or ``None`` (the prompts).
    """

    bounds: np.ndarray
    prompts_all: np.ndarray
    weights_all: np.ndarray
    keys_all: np.ndarray | None = None
    init_all: np.ndarray | None = None
    features_all: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.bounds.size - 1)

    def split(self, stacked: np.ndarray) -> list[np.ndarray]:
        """Per-client views of a stacked array."""
        return [stacked[a:b] for a, b in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist())]

    @property
    def prompts(self) -> list[np.ndarray]:
        return self.split(self.prompts_all)

    @property
    def weights(self) -> list[np.ndarray]:
        return self.split(self.weights_all)

    @property
    def keys(self) -> list[np.ndarray] | None:
        return None if self.keys_all is None else self.split(self.keys_all)

    @property
    def init(self) -> list[np.ndarray] | None:
        return None if self.init_all is None else self.split(self.init_all)

    @property
    def features(self) -> list[np.ndarray] | None:
        return None if self.features_all is None else self.split(self.features_all)

    @property
    def matched_all(self) -> np.ndarray:
        """What the clustering compares: the features when given, else the prompts."""
        return self.features_all if self.features_all is not None else self.prompts_all


def _stack(arrays: Sequence[np.ndarray], dtype: type | None) -> np.ndarray:
    """One new array of the per-client arrays, converted as ``np.asarray(a, dtype)`` would.

    ``dtype=None``: float64, or float32 when every array is float32 (kept: widening later is exact).
    """
    if dtype is None:
        dtype = np.float32 if all(a.dtype == np.float32 for a in arrays) else np.float64
    return np.concatenate(arrays, axis=0, dtype=dtype, casting="unsafe")


def _first_bad_client(bad_rows: np.ndarray, bounds: np.ndarray) -> int | None:
    """The first client owning a row flagged in ``bad_rows`` ``(N,)``, or ``None``."""
    rows = np.flatnonzero(bad_rows)
    return None if rows.size == 0 else int(np.searchsorted(bounds, rows[0], side="right")) - 1


def _nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """``(N,)`` whether each row holds a NaN or Inf (checked in blocks, no full-size temporary)."""
    bad = np.zeros(values.shape[0], dtype=bool)
    for start in range(0, values.shape[0], _BLOCK_ROWS):
        block = values[start : start + _BLOCK_ROWS]
        bad[start : start + _BLOCK_ROWS] = ~np.isfinite(block).all(axis=1)
    return bad


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
    raw = [np.asarray(p) for p in client_prompts]
    dims = {p.shape[1] if p.ndim == 2 else None for p in raw}
    if None in dims or len(dims) != 1:
        raise ValueError(
            f"every client's prompts must be a (m_t, D) array with one D; got shapes {[p.shape for p in raw]}"
        )
    sizes = np.array([p.shape[0] for p in raw], dtype=np.int64)
    if sizes.sum() == 0:
        raise ValueError("align_prompts got no prompts at all")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    prompts = _stack(raw, np.float64 if client_features is None else None)
    bad = _first_bad_client(_nonfinite_rows(prompts), bounds)
    if bad is not None:
        raise ValueError(f"client {bad}'s prompts contain NaN or Inf")
    n = len(raw)
    weights = np.ones(n) if client_weights is None else np.asarray(client_weights, dtype=np.float64)
    if weights.shape != (n,) or not np.isfinite(weights).all() or np.any(weights <= 0):
        raise ValueError(f"client_weights must be {n} positive numbers, got {client_weights!r}")
    if prompt_weights is None:
        row_weights = np.repeat(weights, sizes)
    else:
        given = [np.asarray(w) for w in prompt_weights]
        if len(given) != n or any(w.shape != (m,) for w, m in zip(given, sizes.tolist())):
            raise ValueError("prompt_weights must hold one (m_t,) array per client, row-aligned with its prompts")
        row_weights = _stack(given, np.float64) if given else np.zeros(0)
        if not np.isfinite(row_weights).all() or np.any(row_weights <= 0):
            raise ValueError("prompt_weights must be positive, finite numbers")
    keys = None
    if client_keys is not None:
        raw_keys = [np.asarray(k) for k in client_keys]
        if len(raw_keys) != n or any(k.ndim != 2 or k.shape[0] != m for k, m in zip(raw_keys, sizes.tolist())):
            raise ValueError("client_keys must hold one (m_t, Dk) array per client, row-aligned with its prompts")
        if len({k.shape[1] for k in raw_keys}) != 1:
            raise ValueError("every client's keys must have the same width")
        keys = _stack(raw_keys, None)
    init = None
    if init_assignments is not None:
        raw_init = [np.asarray(a) for a in init_assignments]
        if len(raw_init) != n or any(a.shape != (m,) for a, m in zip(raw_init, sizes.tolist())):
            raise ValueError("init_assignments must hold one (m_t,) index array per client")
        init = _stack(raw_init, np.int64)
        client = np.repeat(np.arange(n), sizes)
        placed = np.flatnonzero(init >= 0)
        order = placed[np.lexsort((init[placed], client[placed]))]
        repeated = np.zeros(init.size, dtype=bool)
        repeated[order[1:][(client[order[1:]] == client[order[:-1]]) & (init[order[1:]] == init[order[:-1]])]] = True
        bad = _first_bad_client((init < -1) | repeated, bounds)
        if bad is not None:
            raise ValueError(
                f"init_assignments of client {bad} must be distinct non-negative indices (-1: no warm start)"
            )
    features = None
    if client_features is not None:
        raw_features = [np.asarray(f) for f in client_features]
        if len(raw_features) != n or any(f.ndim != 2 or f.shape[0] != m for f, m in zip(raw_features, sizes.tolist())):
            raise ValueError("client_features must hold one (m_t, F) array per client, row-aligned with its prompts")
        if len({f.shape[1] for f in raw_features}) != 1:
            raise ValueError("every client's features must have the same width")
        features = _stack(raw_features, np.float64)
        if _nonfinite_rows(features).any():
            raise ValueError("client_features contain NaN or Inf")
    return _Inputs(bounds, prompts, row_weights, keys, init, features)


#: Elements per leaf of :func:`_centred_mean_square` (256 KB: a leaf's squares stay in cache).
_SQUARE_LEAF = 1 << 15


def _centred_mean_square(values: np.ndarray, offset: np.ndarray) -> float:
    """Subtract ``offset`` ``(D,)`` from the C-ordered ``values`` ``(N, D)`` in place; return ``np.mean(values**2)``.

    Bit-for-bit ``values -= offset; np.mean(values**2)`` without the ``(N, D)`` temporary of
    squares: NumPy sums a contiguous array pairwise (halves rounded down to a multiple of 8,
    down to blocks of 128), so the flattened squares are summed here along the same tree,
    each leaf of at most ``_SQUARE_LEAF`` elements by NumPy itself into one reused buffer,
    and the rows are centred just before their leaf is squared (while they are in cache).
    :func:`tests.test_alignment_solver` checks it against the two lines it replaces.
    """
    rows, dim = values.shape
    flat = values.reshape(-1)
    if flat.size == 0 or dim == 0:
        values -= offset
        return float(np.mean(values**2))
    buffer = np.empty(min(flat.size, _SQUARE_LEAF))
    centred = 0  # rows centred so far

    def tree(start: int, count: int) -> float:
        nonlocal centred
        if count <= _SQUARE_LEAF:
            end = -(-(start + count) // dim)  # the rows this leaf reaches into
            if end > centred:
                values[centred:end] -= offset
                centred = end
            leaf = buffer[:count]
            np.square(flat[start : start + count], out=leaf)
            return np.add.reduce(leaf)
        half = count // 2
        half -= half % 8
        return tree(start, half) + tree(start + half, count - half)

    total = tree(0, flat.size)
    return float(total / flat.size)


def _ordered_rounds(index: np.ndarray) -> list[np.ndarray]:
    """Positions ``0..N-1`` of ``index`` ``(N,)`` in rounds that update every target at most once.

    Round ``r`` holds, for every target, its ``r``-th position (in increasing order), so
    ``for r in rounds: target[index[r]] += values[r]`` adds to every target the same terms in
    the same order as a loop over positions (bit-for-bit its sums), with one vectorised
    update per round: as many rounds as the largest target's count, not one per position
    (``np.add.at`` does the same in order, but one row at a time and much slower on rows).
    """
    if index.size == 0:
        return []
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_index[1:] != sorted_index[:-1]]))
    rank = np.arange(index.size) - np.repeat(starts, np.diff(np.concatenate([starts, [index.size]])))
    by_rank = np.argsort(rank, kind="stable")
    cuts = np.flatnonzero(np.diff(rank[by_rank])) + 1
    return np.split(order[by_rank], cuts)


def _ordered_sums(
    index: np.ndarray,
    targets: int,
    width: int,
    term: Callable[[np.ndarray, np.ndarray | int], np.ndarray],
    fill: Callable[[np.ndarray, int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """``(targets, width)``: for every target, the sum of ``term`` over the positions ``index`` sends to it.

    Bit-for-bit the loop ``out = 0; for i: out[index[i]] += term([i])`` (each target's terms
    added one by one in position order). ``term(positions, target)`` gives the rows
    ``(len(positions), width)`` of those positions, ``target`` their common target (an int),
    or their targets (an array, one per position). With few targets each target's terms
    are summed at once (``np.add.reduce`` along the rows of a C-ordered block adds them one
    row after the other; :func:`tests.test_alignment_solver` checks it against the loop),
    otherwise in :func:`_ordered_rounds`.

    ``fill(positions, target, out)``, if given, writes what ``term(positions, target)`` would
    return into ``out`` (a C-ordered float64 block reused from target to target, so the
    per-target sums allocate no new block: the same values, summed the same way).
    """
    out = np.zeros((targets, width))
    if index.size == 0:
        return out
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    cuts = np.flatnonzero(sorted_index[1:] != sorted_index[:-1]) + 1
    if cuts.size + 1 > _SEGMENT_LOOP_MAX or width < 2:
        for members in _ordered_rounds(index):
            out[index[members]] += term(members, index[members])
        return out
    segments = np.split(order, cuts)
    if fill is not None:
        buffer = np.empty((max(segment.size for segment in segments), width))
        for segment in segments:
            target = int(index[segment[0]])
            rows = buffer[: segment.size]
            fill(segment, target, rows)
            out[target] = np.add.reduce(rows, axis=0)
        return out
    for segment in segments:
        target = int(index[segment[0]])
        out[target] = np.add.reduce(np.ascontiguousarray(term(segment, target)), axis=0)
    return out


class _ClusterState:
    """Cluster slots with running weighted sums, for O(1) add/remove of members.

    Slots ``0 .. reserved-1`` hold the warm-start clusters (slot = label); clusters opened
    during the alignment only take slots from ``reserved`` on, so a warm-start label is
    never reused for a different cluster. The arrays grow on demand (a new cluster takes the
    lowest free slot), so memory follows the number of clusters, not of prompts.

    Per slot it also keeps what the likelihood of a prompt under the cluster needs
    (``1 / scale^2``, ``centre / scale^2``, ``sum centre^2 / scale^2``, ``sum log scale``),
    recomputed only for slots whose members or scale changed (``valid``), with exactly the
    arithmetic of :func:`_gaussian_loglik`, so that a likelihood built from them is
    bit-for-bit the one :func:`_gaussian_loglik` returns. ``version`` changes whenever the
    set of active slots or a scale changes (what the mean scale of the new-cluster prior
    depends on).
    """

    def __init__(self, dim: int, reserved: int = 0, capacity: int = 0) -> None:
        self.reserved = reserved
        self.dim = dim
        capacity = max(capacity, reserved + 16)
        self.sums = np.zeros((capacity, dim))
        self.weight = np.zeros(capacity)
        self.members = np.zeros(capacity, dtype=np.int64)
        self.scale = np.ones((capacity, dim))
        self.logit_pop = np.zeros(capacity)
        self.inv_var = np.zeros((capacity, dim))
        self.scaled_centre = np.zeros((capacity, dim))
        self.centre_norm = np.zeros(capacity)
        self.log_det = np.zeros(capacity)
        self.valid = np.zeros(capacity, dtype=bool)
        self.scale_valid = np.zeros(capacity, dtype=bool)
        self.rescaled = True  # some slot's scale changed since its parts were computed
        self.version = 0
        self._active: tuple[int, np.ndarray] | None = None

    @property
    def capacity(self) -> int:
        return self.members.size

    def grow(self, capacity: int) -> None:
        """Room for at least ``capacity`` slots (new slots empty, scale 1)."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        extra = capacity - self.capacity
        self.sums = np.concatenate([self.sums, np.zeros((extra, self.dim))])
        self.weight = np.concatenate([self.weight, np.zeros(extra)])
        self.members = np.concatenate([self.members, np.zeros(extra, dtype=np.int64)])
        self.scale = np.concatenate([self.scale, np.ones((extra, self.dim))])
        self.logit_pop = np.concatenate([self.logit_pop, np.zeros(extra)])
        self.inv_var = np.concatenate([self.inv_var, np.zeros((extra, self.dim))])
        self.scaled_centre = np.concatenate([self.scaled_centre, np.zeros((extra, self.dim))])
        self.centre_norm = np.concatenate([self.centre_norm, np.zeros(extra)])
        self.log_det = np.concatenate([self.log_det, np.zeros(extra)])
        self.valid = np.concatenate([self.valid, np.zeros(extra, dtype=bool)])
        self.scale_valid = np.concatenate([self.scale_valid, np.zeros(extra, dtype=bool)])
        self.rescaled = True

    def add(
        self, slots: np.ndarray, z: np.ndarray, w: np.ndarray, sign: float = 1.0, term: np.ndarray | None = None
    ) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) one client's prompts ``z`` ``(m, D)`` of weights ``w`` ``(m,)``.

        ``term``: ``w[:, None] * z`` if already computed. A removal subtracts it: ``s - w z`` is
        bit-for-bit ``s + (-w) z`` (negation is exact and rounding symmetric).
        """
        if term is None:
            term = w[:, None] * z
        if sign < 0:
            self.sums[slots] -= term
            self.weight[slots] -= w
        else:
            self.sums[slots] += term
            self.weight[slots] += w
        count = self.members[slots] + int(sign)
        self.members[slots] = count
        self.valid[slots] = False
        if sign < 0:
            emptied = slots[count == 0]
            if emptied.size:
                self.sums[emptied] = 0.0  # no floating-point residue in a reusable slot
                self.weight[emptied] = 0.0
                self.version += 1  # the set of active slots changed
        elif (count == 1).any():
            self.version += 1

    def add_many(self, slots: np.ndarray, z: np.ndarray, w: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Add the prompts of many clients at once, ``(N,)`` slots in client order.

        Every slot receives the same additions in the same order as one :meth:`add` per
        client would give it (:func:`_ordered_rounds`; ``np.add.at`` for the 1-D weights), so
        the sums are bit-for-bit those of the client-by-client loop.

        ``rows``: ``(N,)`` the rows of ``z`` and ``w`` added (default: all of them, in order),
        so that a subset is added without first copying its rows out of ``z``.
        """
        if rows is not None:
            w = w[rows]
        else:
            rows = np.arange(slots.size)
        targets = np.unique(slots)
        if not self.sums[targets].any():  # (empty clusters: 0 + the ordered sum is that sum)

            def weighted(at: np.ndarray, _: int, out: np.ndarray) -> None:
                np.take(z, rows[at], axis=0, out=out)
                np.multiply(w[at, None], out, out=out)

            summed = _ordered_sums(
                slots, self.capacity, self.dim, lambda at, _: w[at, None] * z[rows[at]], fill=weighted
            )
            self.sums[targets] = summed[targets]
        else:
            for members in _ordered_rounds(slots):
                self.sums[slots[members]] += w[members, None] * z[rows[members]]
        np.add.at(self.weight, slots, w)
        np.add.at(self.members, slots, 1)
        self.valid[slots] = False
        self.version += 1

    def active(self) -> np.ndarray:
        """The occupied slots, ascending (cached per :attr:`version`, which changes whenever the set does)."""
        if self._active is None or self._active[0] != self.version:
            self._active = (self.version, np.flatnonzero(self.members > 0))
        return self._active[1]

    def centres(self, slots: np.ndarray) -> np.ndarray:
        return self.sums[slots] / self.weight[slots, None]

    def free_slots(self, count: int) -> np.ndarray:
        free = np.flatnonzero(self.members[self.reserved :] == 0)[:count] + self.reserved
        if free.size < count:
            start = self.capacity
            self.grow(start + count - free.size)
            free = np.concatenate([free, np.arange(start, start + count - free.size)])
        return free

    def set_scale(self, slots: np.ndarray, scale: np.ndarray, logit_pop: np.ndarray | None) -> None:
        self.scale[slots] = scale
        if logit_pop is not None:
            self.logit_pop[slots] = logit_pop
        self.valid[slots] = False
        self.scale_valid[slots] = False
        self.rescaled = True
        self.version += 1

    def fresh_parts(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`likelihood_parts` computed for every slot from its centre now (the same arithmetic, no cache).

        For few compared entries, where a step changes most clusters' centres and the
        bookkeeping of which parts are stale costs more than computing them all.
        """
        self._rescale()
        centres, inv_var = self.centres(slots), self.inv_var[slots]
        return inv_var, centres * inv_var, (centres**2 * inv_var).sum(axis=1), self.log_det[slots]

    def likelihood_parts(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``1/s^2`` ``(K, D)``, ``c/s^2`` ``(K, D)``, ``sum c^2/s^2`` ``(K,)``, ``sum log s`` ``(K,)`` of ``slots``."""
        self._rescale()
        stale = slots[~self.valid[slots]]
        if stale.size:
            centres, inv_var = self.centres(stale), self.inv_var[stale]
            self.scaled_centre[stale] = centres * inv_var
            self.centre_norm[stale] = (centres**2 * inv_var).sum(axis=1)
            self.valid[stale] = True
        return self.inv_var[slots], self.scaled_centre[slots], self.centre_norm[slots], self.log_det[slots]

    def _rescale(self) -> None:
        if self.rescaled:  # what depends on the scale only (members moving leave it as it is), every slot
            rescaled = np.flatnonzero(~self.scale_valid)
            scale = self.scale[rescaled]
            self.inv_var[rescaled] = 1.0 / scale**2
            self.log_det[rescaled] = np.log(scale).sum(axis=1)
            self.scale_valid[rescaled] = True
            self.rescaled = False


def _loglik_from_parts(
    z: np.ndarray, inv_var: np.ndarray, scaled_centre: np.ndarray, centre_norm: np.ndarray, log_det: np.ndarray
) -> np.ndarray:
    """``log N(z_i | centre_q, diag scale_q^2)`` ``(m, K)`` from the per-cluster parts of :func:`_gaussian_loglik`."""
    quad = (z**2) @ inv_var.T - 2.0 * z @ scaled_centre.T + centre_norm
    return -0.5 * np.maximum(quad, 0.0) - log_det - 0.5 * z.shape[1] * _LOG_2PI


def _gaussian_loglik(z: np.ndarray, centres: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``log N(z_i | centre_q, diag scale_q^2)`` for every pair: ``(m, K)``, vectorised.

    ``sum_d (z - c)^2 / s^2`` is expanded into matrix products so the cost is
    ``O(m K D)`` BLAS work with no loop over centres.
    """
    inv_var = 1.0 / scale**2  # (K, D)
    parts = (inv_var, centres * inv_var, np.sum(centres**2 * inv_var, axis=1), np.sum(np.log(scale), axis=1))
    return _loglik_from_parts(z, *parts)


def _prior_loglik(z: np.ndarray, mean_var: np.ndarray) -> np.ndarray:
    """Prior-predictive log-likelihood of opening a new cluster at ``z``: ``(m,)``."""
    var = 1.0 + mean_var  # (D,)
    return -0.5 * np.sum(z**2 / var + np.log(var), axis=1) - 0.5 * z.shape[1] * _LOG_2PI


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _certified_choice(lo: np.ndarray, hi: np.ndarray, new_gain: np.ndarray) -> np.ndarray | None:
    """The Hungarian step's answer when every row's best column beats all its others, else ``None``.

    ``lo <= gain <= hi`` ``(m, K)`` bound each row's gain for the existing clusters (``lo is
    hi``: the gains themselves); ``new_gain`` ``(m,)`` is each row's own new-cluster column
    (column ``K + p`` of the full problem; the other rows' new columns are infeasible). If
    for every row one column's lower bound exceeds the upper bounds of all its other
    columns (strictly), and no two rows pick the same existing cluster, then whatever the
    gains within the bounds, giving every row that column is the unique optimal assignment
    (any other one moves some row to a strictly smaller entry and no row can gain), and
    ``linear_sum_assignment`` returns exactly it: it augments row by row, and each row's
    cheapest column is still free, so its augmenting path is that single edge.

    Returns:
        ``(m,)`` column of each row in the full ``(m, K + m)`` problem, or ``None``.
    """
    m, k = lo.shape
    rows = np.arange(m)
    if k == 0:
        return k + rows  # only the new-cluster columns: the diagonal
    if lo is hi:
        return _certified_exact(lo, new_gain, rows)
    best = np.argmax(lo, axis=1)
    best_lo = lo[rows, best]
    others = hi.copy()
    others[rows, best] = -np.inf
    highest_other = others.max(axis=1)
    existing = (best_lo > highest_other) & (best_lo > new_gain)
    fresh = new_gain > np.maximum(highest_other, hi[rows, best])
    if not np.all(existing | fresh):
        return None
    picked = best[existing]
    if np.unique(picked).size != picked.size:
        return None
    return np.where(existing, best, k + rows)


def _certified_exact(gain: np.ndarray, new_gain: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """:func:`_certified_choice` for exact gains (``lo is hi``), in fewer array operations (one per exact step).

    A row's best column beats all its others strictly iff it is the only entry at the row
    maximum; the new cluster beats them all iff it exceeds that maximum.
    """
    k = gain.shape[1]
    best = np.argmax(gain, axis=1)
    top = gain[rows, best]
    existing = ((gain >= top[:, None]).sum(axis=1) == 1) & (top > new_gain)
    fresh = new_gain > top
    if not (existing | fresh).all():
        return None
    picked = best[existing].tolist()
    if len(set(picked)) != len(picked):
        return None
    return np.where(existing, best, k + rows)


@dataclasses.dataclass
class _PassCache:
    """What the fast solver knows during one pass of client steps (a sweep, or the initial placement).

    Every *column* is a cluster as it was when the column was built: the residual
    ``quad[r, j] = sum_d (z_r - c_j)^2 / s_j^2`` of every prompt row against its centre
    ``centre[j]`` (in one blocked matrix product), its ``1 / s^2`` and constant. When the
    cluster's members change, ``shift[j]`` records how far (in the ``1 / s^2``-weighted
    norm) its centre has moved since; when it is emptied or its scale re-evaluated, the
    column dies (a cluster in that slot later gets a new column).

    Attributes:
        quad: ``(N, C)`` residuals at build (columns grow on demand). The columns of the
            clusters at the start of the pass are computed for every row at once; a column
            built during the pass only for the rows about to be bounded (``ready``), since
            building it for all ``N`` rows streams all ``N x D`` entries again.
        scaled_centre, centre_norm: ``(C, D)`` ``c / s^2`` and ``(C,)`` ``sum c^2 / s^2`` of
            each column when built (what its residuals are computed from).
        ready: ``(N,)`` each row's residuals hold for the columns below this id.
        slot: ``(C,)`` the cluster slot of each column, ``-1`` once dead.
        column: ``(capacity,)`` the live column of each slot, or ``-1``.
        centre, inv_var: ``(C, D)`` the column's centre and ``1 / s^2`` when built.
        const: ``(C,)`` ``sum log s + D/2 log 2 pi`` (the gain is ``-quad/2 - const + logit U``).
        shift: ``(C,)`` distance of the current centre from ``centre`` (0 while unchanged).
        prior: ``(N,)`` the new-cluster gain of every row, computed at state version ``version[row]``
            (the prior depends on the active clusters' scales only; recomputed when stale).
        touches: client steps since the pass began (their removal and re-addition of prompts
            moves centres by rounding; see ``ClusterAlignment._rounding_bound``).
        queue: clients whose step changed nothing, in order; their removal and re-addition
            is applied (:meth:`ClusterAlignment.flush`) before the state is next needed.
        fallback: work of the exact steps since the last rebuild (rows x columns).
        epoch: changes whenever a column is built, moved or dies (bounds computed before are stale).
        structure: changes whenever a column is built or dies (the live columns are others).
    """

    quad: np.ndarray
    slot: np.ndarray
    column: np.ndarray
    centre: np.ndarray
    inv_var: np.ndarray
    const: np.ndarray
    shift: np.ndarray
    scaled_centre: np.ndarray
    centre_norm: np.ndarray
    ready: np.ndarray
    prior: np.ndarray | None = None
    version: np.ndarray | None = None
    count: int = 0
    touches: int = 0
    queue: list[int] = dataclasses.field(default_factory=list)
    fallback: int = 0
    epoch: int = 0
    structure: int = 0

    def live(self) -> np.ndarray:
        """Ids of the live columns, ascending."""
        return np.flatnonzero(self.slot[: self.count] >= 0)


class ClusterAlignment:
    """The alternating optimisation of the module docstring, one step per method.

    Prompts are standardised once (global mean, one RMS scale); the cluster state holds
    running weighted sums so that moving one client's prompts costs ``O(m_t D)``. A run is
    :meth:`initial_assignment`, then :meth:`sweep` (alpha-step for every client in a seeded
    order, then :meth:`theta_step`) until a sweep changes nothing or ``n_sweeps`` are done,
    then :meth:`result`. :func:`align_prompts` does exactly that.

    Two solvers give the same assignments (``solver``):

    * ``"dense"``: every client step computes the gain of each of its prompts against every
      cluster and solves the Hungarian problem over all of them (the reference).
    * ``"fast"``: at the start of a pass the residuals of all prompts against all clusters
      are one blocked matrix product (:class:`_PassCache`). A client step then bounds each
      gain from them without touching the prompts' ``D`` entries: a cluster whose centre has
      moved by ``delta`` since (members joined or left) has residual within
      ``(sqrt(quad) -+ delta)^2`` (triangle inequality); the client's own clusters, from
      which its prompts are removed first, have the closed form ``c' = c + a (c - z)``,
      ``a = w / (W - w)``, so the prompt's own residual is ``(1 + a)^2`` times its residual
      to ``c``. If these bounds, widened by the rounding bound ``E``
      (:meth:`_rounding_bound`), give every prompt a column that beats all its others and
      no two prompts the same cluster, that is the dense solver's answer
      (:func:`_certified_choice`). A step whose answer leaves the client where it was only
      queues its removal and re-addition (applied in order, in vectorised rounds, before the
      state is next needed); one that moves prompts applies the move. Otherwise (a near
      tie, two prompts wanting one cluster, bounds too wide) the step computes the gains
      exactly as the dense solver does and solves the same Hungarian problem. The cluster
      state sees the same operations in the same order in both solvers, so every later
      step, the theta-steps and the result are bit-for-bit the dense solver's. Columns
      whose centres moved far are rebuilt once the exact steps they caused cost as much
      as rebuilding them. A batch of upcoming clients is bounded at once, and a second
      time with widened bounds that still hold after later steps have moved the
      clusters a little, so the steps after a move need no new bounds
      (:meth:`run_pass`); a column opened during a pass is computed only for the rows
      about to be bounded.

    The fast solver's exact steps also skip ``linear_sum_assignment`` when the gains have
    one strict, distinct maximum per prompt (its answer is then that maximum, as above).

    Args:
        inputs: validated prompts, per-prompt weights, keys and warm-start labels.
        popularity: ``"learned"`` (the popularity net ``U(theta; zeta)``) or
            ``"empirical"`` (the PFNM-style rate of the other clients using a cluster).
        hidden: the nets' width.
        lr: the Adam step.
        grad_steps: Adam steps per theta-step.
        min_scale: the scale's lower bound (standardised units).
        seed: client order and net initialisation.
        solver: ``"fast"`` or ``"dense"`` (above).
        in_place: standardise ``inputs.matched_all`` in place instead of a copy (saves one
            ``(N, D)`` array; :func:`align_prompts` owns the inputs it validated). The
            prompts are not needed afterwards unless features were compared.
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
        solver: str = "fast",
        in_place: bool = False,
    ) -> None:
        self.inputs = inputs
        self.n = inputs.n
        self.grad_steps = grad_steps
        if popularity not in ("learned", "empirical"):
            raise ValueError(f"popularity must be 'learned' or 'empirical', got {popularity!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver
        self.rng = np.random.default_rng(seed)
        # Standardise the stacked rows (the same arithmetic as client by client).
        stacked = inputs.matched_all if in_place else inputs.matched_all.copy()
        self.offset = stacked.mean(axis=0)
        self.spread = float(np.sqrt(_centred_mean_square(stacked, self.offset))) or 1.0
        stacked /= self.spread
        self.z_all = stacked
        self.bounds = inputs.bounds
        self.z = inputs.split(stacked)
        self.mean_weight = float(inputs.weights_all.mean())
        self.w_all = inputs.weights_all / self.mean_weight
        self.w = inputs.split(self.w_all)
        self.dim = stacked.shape[1]
        # Few compared entries (every step exact): each client's ``w z`` once, not twice per step.
        self.wz = inputs.split(self.w_all[:, None] * stacked) if self.dim < _CACHE_MIN_DIM else None
        # ... and its ``z^2`` and ``2 z`` (what every exact step's gains start from, the same values)
        self.z_squared = inputs.split(stacked**2) if self.wz is not None else None
        self.z_doubled = inputs.split(2.0 * stacked) if self.wz is not None else None
        init = inputs.init_all
        self.reserved = int(init.max()) + 1 if init is not None and init.size and init.max() >= 0 else 0
        sizes = np.diff(self.bounds)
        with torch.random.fork_rng(devices=[]):  # seeded net init without touching global RNG state
            torch.manual_seed(seed)
            self.scale_net = _ScaleNet(self.dim, hidden, min_scale)
            self.pop_net = _PopularityNet(self.dim, hidden) if popularity == "learned" else None
        params = list(self.scale_net.parameters()) + (list(self.pop_net.parameters()) if self.pop_net else [])
        # (the fused update: one kernel per step instead of several passes over every tensor,
        # 0.3 ms instead of 0.8 ms per step here; Adam's arithmetic, rounded in another order.
        # torch before 2.4 has no fused CPU Adam and refuses it: the multi-tensor update then.)
        try:
            self.optimiser = torch.optim.Adam(params, lr=lr, fused=True)
        except RuntimeError:
            self.optimiser = torch.optim.Adam(params, lr=lr, foreach=True)
        self.state = _ClusterState(self.dim, self.reserved, capacity=self.reserved + 2 * int(sizes.max()))
        self.labels = np.full(stacked.shape[0], -1, dtype=np.int64)  # every prompt's cluster slot
        self.assign = inputs.split(self.labels)  # per-client views of it
        self.new_logit = float(_logit(1.0 / max(self.n, 2)))
        self.hungarian_seconds = 0.0
        self.hungarian_calls = 0
        self.client_steps = 0
        self.bounded_steps = 0
        self.widened_steps = 0  # bounded steps settled by the widened bounds after clusters moved
        self.changed = False
        self.cache: _PassCache | None = None
        self._mean_var: tuple[int, np.ndarray] | None = None
        self._prior_terms: tuple[int, np.ndarray, np.ndarray] | None = None
        self.max_abs_z = float(max(stacked.max(), -stacked.min()))
        self.scale_floor = 1.0  # smallest scale entry ever set (bounds 1 / s^2 in the rounding bound)

    # -- the nets at the current centres ------------------------------------------------
    def refresh_nets(self, slots: np.ndarray) -> None:
        """Evaluate the scale (and a learned popularity) at the current centres of ``slots``."""
        if slots.size == 0:
            return
        with torch.no_grad():
            centres = torch.from_numpy(self.state.centres(slots).astype(np.float32))
            scale = self.scale_net(centres).numpy()
            logit_pop = _logit(self.pop_net(centres).numpy()) if self.pop_net is not None else None
        self.state.set_scale(slots, scale, logit_pop)
        self.scale_floor = min(self.scale_floor, float(self.state.scale[slots].min()))

    def popularity_logit(self, slots: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
        """``logit U`` of the clusters in ``slots`` as seen by the client being assigned.

        ``own``: ``(len(slots),)`` whether the client's prompts (not yet removed) are in the
        cluster; the empirical rate counts the other clients only.
        """
        if self.pop_net is not None:
            return self.state.logit_pop[slots]
        others = self.state.members[slots]  # clients other than the one being assigned
        if own is not None:
            others = others - own
        return np.log(others) - np.log(np.maximum(self.n - others, 1))

    def _new_gain(self, z: np.ndarray, slots: np.ndarray, squared: np.ndarray | None = None) -> np.ndarray:
        """The new-cluster column ``(m,)``: ``_prior_loglik(z, mean_var) + logit(1/n)``.

        Its ``var`` terms are cached per state version (the same arithmetic as :func:`_prior_loglik`);
        ``squared``: ``z**2`` if already computed.
        """
        version = self.state.version
        if self._prior_terms is None or self._prior_terms[0] != version:
            var = 1.0 + self.mean_var(slots)
            self._prior_terms = (version, var, np.log(var))
        _, var, log_var = self._prior_terms
        if squared is None:
            squared = z**2
        return (-0.5 * (squared / var + log_var).sum(axis=1) - 0.5 * z.shape[1] * _LOG_2PI) + self.new_logit

    def mean_var(self, slots: np.ndarray) -> np.ndarray:
        """Mean ``scale^2`` of the active clusters ``slots`` (the new-cluster prior's spread), cached per version."""
        if self._mean_var is not None and self._mean_var[0] == self.state.version:
            return self._mean_var[1]
        value = np.mean(self.state.scale[slots] ** 2, axis=0) if slots.size else np.ones(self.dim)
        self._mean_var = (self.state.version, value)
        return value

    # -- alpha-step ---------------------------------------------------------------------
    def initial_assignment(self) -> None:
        """Warm start from the given labels, or one sequential pass from scratch.

        Prompts labelled ``-1`` have no warm start: once the labelled ones are placed, each
        client holding such a prompt is assigned by the Hungarian step (seeded order).
        """
        labels = self.inputs.init_all
        if labels is not None:
            placed = labels >= 0
            self.labels[:] = labels
            self.state.grow(self.reserved + 1)
            # (the placed rows are read where they lie: a copy of them costs an N x D array)
            self.state.add_many(labels[placed], self.z_all, self.w_all, rows=np.flatnonzero(placed))
            self.refresh_nets(self.state.active())
            client = np.repeat(np.arange(self.n), np.diff(self.bounds))
            unplaced = set(np.unique(client[~placed]).tolist())
            order = [int(t) for t in self.rng.permutation(self.n) if int(t) in unplaced] if unplaced else []
        else:
            order = [int(t) for t in self.rng.permutation(self.n)]
        self.run_pass(order)

    def run_pass(self, order: Sequence[int]) -> None:
        """One alpha-step for each client of ``order``, in that order.

        The fast solver bounds the steps of a batch of upcoming clients at once. Those
        bounds hold while no step changes a cluster's members or scale (a step that
        changes nothing only queues its rounding). With the learned popularity the batch
        is also bounded a second time, widened (:meth:`gain_bounds`'s ``slack`` and
        ``rho``): once a step has moved prompts, the rest of the batch is still settled
        by the widened bounds as long as every centre has moved less than the slack and
        every cluster's weight stays within the range (:meth:`_within_slack`), since the
        bounds the cache would give then lie inside the widened ones. The batch is used
        up to the first step that neither settles, and the next batch starts there
        (batches double while they are used up, and shrink to what was used when not).
        """
        if not order:
            return
        self.open_pass()
        cache, state = self.cache, self.state
        order = np.asarray(order, dtype=np.int64)
        widen = self.pop_net is not None and order.size >= _WIDEN_MIN_CLIENTS
        done, size = 0, 64
        while done < order.size:
            if cache is None:
                self.assign_client(int(order[done]))
                done += 1
                continue
            batch = order[done : done + size]
            epoch, version, structure = cache.epoch, state.version, cache.structure
            strict = self.gain_bounds(batch)
            settled, target = self._choose(strict, batch.size)
            loose = None
            if widen and batch.size > 1 and strict["slots"].size:
                loose = self._widened(batch, strict)
            first = np.concatenate([[0], np.cumsum(self.bounds[batch + 1] - self.bounds[batch])])
            used, checked = 0, epoch
            for k, t in enumerate(batch.tolist()):
                decision = (bool(settled[k]), target[first[k] : first[k + 1]])
                if cache.epoch != epoch or state.version != version:
                    # a step changed the clusters: the widened bounds, while they hold
                    if loose is None or not loose["settled"][k] or state.version != version:
                        break
                    if cache.epoch != checked:
                        if cache.structure != structure or not self._within_slack(loose):
                            break
                        checked = cache.epoch
                    decision = (True, loose["target"][first[k] : first[k + 1]])
                    self.widened_steps += 1
                self.assign_client(t, decision)
                used += 1
            done += used
            size = min(2 * size, _MAX_BATCH) if used == batch.size else used
        self.close_pass()

    def _widened(self, batch: np.ndarray, strict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's steps settled by widened bounds, and what :meth:`_within_slack` checks them against.

        The slack is a share (``_SLACK``) of the rows' typical distance to their nearest
        centre: a client's step moves a cluster of ``W`` members' weight by about that
        distance over ``W``, so many steps fit in it before a recheck.
        """
        cache, state = self.cache, self.state
        slack = _SLACK * float(np.median(strict["root"].min(axis=1)))
        settled, target = self._bounded_choices(batch, slack, _WEIGHT_SLACK)
        own = strict["own"]
        slots = np.unique(own[own >= 0])
        slots = slots[state.members[slots] >= 2]  # (the others' clients are not settled)
        live = cache.live()
        return {
            "settled": settled,
            "target": target,
            "live": live,
            "shift-cap": cache.shift[live] + slack,
            "slots": slots,
            "weight-lo": (1.0 - _WEIGHT_SLACK) * state.weight[slots],
            "weight-hi": (1.0 + _WEIGHT_SLACK) * state.weight[slots],
        }

    def _within_slack(self, loose: dict[str, np.ndarray]) -> bool:
        """Whether the clusters moved within the widened bounds of :meth:`_widened` (same live columns).

        Every live column's centre lies within its shift plus the slack of the column's
        centre; every own cluster of the batch's rows still has two members or more and
        a weight in the range. The popularity and scales are unchanged (same state version).
        """
        cache, state = self.cache, self.state
        slots = loose["slots"]
        weight = state.weight[slots]
        return bool(
            (cache.shift[loose["live"]] <= loose["shift-cap"]).all()
            and (state.members[slots] >= 2).all()
            and (weight >= loose["weight-lo"]).all()
            and (weight <= loose["weight-hi"]).all()
        )

    def open_pass(self) -> None:
        """Residuals of every prompt against every active cluster, in row blocks (fast solver)."""
        self.cache = None
        if self.solver != "fast" or self.dim < _CACHE_MIN_DIM:
            return  # (few features: a step's exact gains cost no more than its bounds)
        slots = self.state.active()
        capacity = slots.size + 32
        rows = self.z_all.shape[0]
        self.cache = _PassCache(
            quad=np.zeros((rows, capacity)),
            slot=np.full(capacity, -1, dtype=np.int64),
            column=np.full(self.state.capacity, -1, dtype=np.int64),
            centre=np.zeros((capacity, self.dim)),
            inv_var=np.zeros((capacity, self.dim)),
            const=np.zeros(capacity),
            shift=np.zeros(capacity),
            scaled_centre=np.zeros((capacity, self.dim)),
            centre_norm=np.zeros(capacity),
            ready=np.zeros(rows, dtype=np.int64),
        )
        self.cache.prior = np.empty(rows)
        self.cache.version = np.full(rows, self.state.version, dtype=np.int64)
        self.add_columns(slots, with_prior=True)

    def close_pass(self) -> None:
        if self.cache is not None:
            self.flush()
        self.cache = None

    def add_columns(self, slots: np.ndarray, with_prior: bool = False) -> None:
        """(Re)build the columns of ``slots`` from the current state; ``with_prior``: every row's prior too."""
        cache = self.cache
        if cache is None or (slots.size == 0 and not with_prior):
            return
        self.flush()
        old = cache.column[slots[slots < cache.column.size]]
        cache.slot[old[old >= 0]] = -1
        needed = cache.count + slots.size
        if needed > cache.slot.size:
            grow = max(needed, 2 * cache.slot.size) - cache.slot.size
            cache.quad = np.concatenate([cache.quad, np.zeros((cache.quad.shape[0], grow))], axis=1)
            cache.slot = np.concatenate([cache.slot, np.full(grow, -1, dtype=np.int64)])
            cache.centre = np.concatenate([cache.centre, np.zeros((grow, self.dim))])
            cache.inv_var = np.concatenate([cache.inv_var, np.zeros((grow, self.dim))])
            cache.const = np.concatenate([cache.const, np.zeros(grow)])
            cache.shift = np.concatenate([cache.shift, np.zeros(grow)])
            cache.scaled_centre = np.concatenate([cache.scaled_centre, np.zeros((grow, self.dim))])
            cache.centre_norm = np.concatenate([cache.centre_norm, np.zeros(grow)])
        if cache.column.size < self.state.capacity:
            extra = self.state.capacity - cache.column.size
            cache.column = np.concatenate([cache.column, np.full(extra, -1, dtype=np.int64)])
        new = np.arange(cache.count, needed)
        inv_var, scaled_centre, centre_norm, log_det = self.state.likelihood_parts(slots)
        if with_prior:  # the start of a pass: every row against every column, in row blocks
            inverse, log_sum = self._prior_parts()
            inv_var = np.concatenate([inv_var, inverse[None]])  # the prior's sum rides along as one more column
            for start in range(0, cache.quad.shape[0], _PRODUCT_ROWS):
                block = slice(start, start + _PRODUCT_ROWS)
                z = self.z_all[block]
                squares = (z**2) @ inv_var.T
                cache.prior[block] = self._prior_from(squares[:, -1], log_sum)
                cache.quad[block, new] = squares[:, :-1] - 2.0 * z @ scaled_centre.T + centre_norm
            inv_var = inv_var[:-1]
            cache.ready[:] = needed
        # (during a pass, :meth:`_fill` computes a new column for the rows about to be bounded, so
        # a cluster opened mid-pass no longer squares all N x D entries again)
        cache.slot[new] = slots
        cache.column[slots] = new
        cache.centre[new] = self.state.centres(slots)
        cache.inv_var[new] = inv_var
        cache.scaled_centre[new] = scaled_centre
        cache.centre_norm[new] = centre_norm
        cache.const[new] = log_det + 0.5 * self.dim * _LOG_2PI
        cache.shift[new] = 0.0
        cache.count = needed
        cache.epoch += 1
        cache.structure += 1

    def _fill(self, rows: np.ndarray) -> None:
        """Compute the live columns built during the pass for ``rows`` that lack them (as :meth:`add_columns` would)."""
        cache = self.cache
        need = rows[cache.ready[rows] < cache.count]
        if need.size == 0:
            return
        low = int(cache.ready[need].min())
        cols = low + np.flatnonzero(cache.slot[low : cache.count] >= 0)
        if cols.size:
            inv_var, scaled_centre, centre_norm = (
                cache.inv_var[cols],
                cache.scaled_centre[cols],
                cache.centre_norm[cols],
            )
            for start in range(0, need.size, _PRODUCT_ROWS):
                block = need[start : start + _PRODUCT_ROWS]
                z = self.z_all[block]
                squares = (z**2) @ inv_var.T
                cache.quad[np.ix_(block, cols)] = squares - 2.0 * z @ scaled_centre.T + centre_norm
        cache.ready[need] = cache.count

    def flush(self) -> None:
        """Apply the queued clients' removal and re-addition of their prompts, in order (fast solver).

        Bit-for-bit what one :meth:`_ClusterState.add` with ``sign=-1`` and one with
        ``sign=1`` per client would do: for every cluster, ``(sum - w z) + w z`` in client
        order (:func:`_ordered_rounds`), and likewise for the weights.
        """
        cache = self.cache
        if cache is None or not cache.queue:
            return
        state = self.state
        if len(cache.queue) <= _FLUSH_ONE_BY_ONE:  # a few clients: one by one costs fewer array operations
            for t in cache.queue:
                slots, z, w = self.assign[t], self.z[t], self.w[t]
                term = w[:, None] * z
                state.sums[slots] = (state.sums[slots] + -term) + term
                state.weight[slots] = (state.weight[slots] + -w) + w
                state.valid[slots] = False
            cache.queue = []
            return
        rows = np.concatenate([np.arange(self.bounds[t], self.bounds[t + 1]) for t in cache.queue])
        slots = self.labels[rows]
        cache.queue = []
        for members in _ordered_rounds(slots):
            at, row = slots[members], rows[members]
            term = self.w_all[row, None] * self.z_all[row]
            state.sums[at] = (state.sums[at] + -term) + term
        signed = np.empty(2 * rows.size)
        signed[0::2], signed[1::2] = -self.w_all[rows], self.w_all[rows]
        np.add.at(state.weight, np.repeat(slots, 2), signed)
        state.valid[slots] = False

    def _rounding_bound(self, touches: int) -> float:
        """Bound ``E`` on how far a gain the fast solver derives can be from the dense solver's.

        With ``u`` the unit roundoff, ``M`` the largest standardised entry (every centre is a
        weighted mean of rows, so ``|c_d| <= M``), ``s_min`` the smallest scale ever set and
        ``R`` client steps in the pass so far:

        * removing and re-adding a member moves a sum by at most ``6 u W M`` and a weight by
          ``6 u W``, so after ``R`` steps a centre entry has moved by at most
          ``delta = (12 R + 1) u M`` from the state the bounds were computed on;
          ``0.5 sum_d (z-c)^2 / s^2`` moves by at most ``2 D M delta / s_min^2``;
        * each of the three length-``D`` products of ``quad`` is computed by BLAS (blocked
          differently in the two solvers) with an error below ``1.01 D u sum |terms|``, and
          ``sum |terms| <= 4 D M^2 / s_min^2`` for both, so they differ by at most
          ``8.1 D^2 M^2 u / s_min^2`` (before the factor ``1/2``);
        * adding ``log det``, the constant and the popularity, and evaluating the bounds
          themselves, costs a few ``u`` of their size.

        The bound takes generous constants over these terms (own-cluster entries, scaled
        by ``(1 + a)^2``, multiply it by that factor).
        """
        u, d, big = _UNIT_ROUNDOFF, self.dim, self.max_abs_z**2
        inv_var = 1.0 / self.scale_floor**2
        quad_terms = inv_var * d * big * (16.0 * (d + 4) + 64.0 * (touches + 1))
        others = 16.0 * (d * (2.0 + abs(np.log(self.scale_floor))) + 20.0 + np.log(self.n + 1.0))
        return u * (quad_terms + others)

    def _exact_gain(self, z: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The existing-cluster gains ``(m, K)`` exactly as the dense solver computes them."""
        if self.solver == "dense":
            gauss = _gaussian_loglik(z, self.state.centres(slots), self.state.scale[slots])
            return gauss + self.popularity_logit(slots)
        if self.wz is not None:  # every step exact: the parts of every slot afresh cost fewer operations
            return _loglik_from_parts(z, *self.state.fresh_parts(slots)) + self.popularity_logit(slots)
        return _loglik_from_parts(z, *self.state.likelihood_parts(slots)) + self.popularity_logit(slots)

    def gain_bounds(self, clients: np.ndarray, slack: float = 0.0, rho: float = 0.0) -> dict[str, np.ndarray]:
        """Bounds on the gains the dense solver would compute for each of ``clients`` if it were next.

        All clients' rows are bounded at once, from the pass cache (class docstring),
        without touching their ``D`` entries.

        ``slack`` and ``rho`` widen the bounds so that they also hold after later steps
        have moved clusters a little (:meth:`run_pass`): every live column's centre may
        have moved ``slack`` further than its ``shift`` says, and the weight ``W`` of each
        row's own cluster may be anywhere in ``[(1 - rho) W, (1 + rho) W]`` (the own
        centre's move ``a = w / (W - w)`` is then in ``[a_lo, a_hi]``). The learned
        popularity only (the empirical one changes with every member); ``0, 0``: the
        bounds at the cache as it is.

        Returns:
            ``rows`` ``(R,)`` the clients' prompt rows, ``owner`` ``(R,)`` each row's client
            (index into ``clients``), ``slots`` ``(C,)`` the live clusters, ``lo``, ``hi``
            ``(R, C)`` bounds on each row's gain for each of them, ``new_lo``, ``new_hi``
            ``(R,)`` on its new-cluster gain, ``described`` ``(k,)``: whether the client's
            step is one the cache describes (``False``: one of its clusters is new or was
            re-scaled this pass, or would be emptied by removing its prompts; its bounds
            are then meaningless), and ``own`` ``(R,)`` each row's cluster slot (``-1``: none).
        """
        cache, state = self.cache, self.state
        sizes = self.bounds[clients + 1] - self.bounds[clients]
        first = np.concatenate([[0], np.cumsum(sizes)])  # each client's first row in the batch
        owner = np.repeat(np.arange(clients.size), sizes)
        rows = self.bounds[clients][owner] + np.arange(first[-1]) - first[owner]
        own = self.labels[rows]
        live = cache.live()
        slots = cache.slot[live]
        own_col = np.full(rows.size, -1, dtype=np.int64)
        placed = np.flatnonzero(own >= 0)
        known = placed[own[placed] < cache.column.size]
        own_col[known] = cache.column[own[known]]
        bad = (own >= 0) & ((own_col < 0) | (state.members[np.maximum(own, 0)] < 2))
        if rho > 0.0:  # a weight range reaching down to the prompt's own weight bounds nothing
            bad[placed] |= (1.0 - rho) * state.weight[own[placed]] - self.w_all[rows[placed]] <= 0.0
        settled = np.bincount(owner[bad], minlength=clients.size) == 0
        mine = np.flatnonzero((own_col >= 0) & settled[owner])  # rows whose own cluster is bounded
        at = np.searchsorted(live, own_col[mine])  # its position among the live columns
        self._fill(rows)
        root = np.sqrt(np.maximum(cache.quad[np.ix_(rows, live)], 0.0))  # (R, C)
        shift = cache.shift[live] + slack if slack else cache.shift[live]
        reach = np.broadcast_to(shift, root.shape).copy()
        w = self.w_all[rows[mine]]
        weight = state.weight[own[mine]]
        # the own centre moves by a (c - z) when the prompt leaves
        if rho > 0.0:
            a_lo, a_hi = w / ((1.0 + rho) * weight - w), w / ((1.0 - rho) * weight - w)
        else:
            a_lo = a_hi = w / (weight - w)
        # every row of the client sees that own centre moved by a |c - z| more (pairs are distinct)
        per = sizes[owner[mine]]
        pair_row = np.repeat(first[owner[mine]], per) + np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
        pair_col = np.repeat(at, per)
        reach[pair_row, pair_col] += np.repeat(a_hi * (root[mine, at] + shift[at]), per)
        low, high = np.maximum(root - reach, 0.0) ** 2, (root + reach) ** 2
        scale = 1.0 + a_hi
        low[mine, at] = ((1.0 + a_lo) * np.maximum(root[mine, at] - shift[at], 0.0)) ** 2
        high[mine, at] = (scale * (root[mine, at] + shift[at])) ** 2
        base = np.broadcast_to(self.popularity_logit(slots) - cache.const[live], root.shape)
        if self.pop_net is None:  # the empirical rate counts the other clients only
            base = base.copy()
            counts = state.members[slots[pair_col]] - 1
            base[pair_row, pair_col] = (
                np.log(counts) - np.log(np.maximum(self.n - counts, 1)) - cache.const[live][pair_col]
            )
        # the batch's clients are bounded now, stepped later: allow for the steps between
        margin = np.full(root.shape, self._rounding_bound(cache.touches + clients.size))
        margin[mine, at] *= scale**2
        lo, hi = base - 0.5 * high - margin, base - 0.5 * low + margin
        new_gain = self.prior_of(rows)
        return {
            "rows": rows,
            "owner": owner,
            "slots": slots,
            "lo": lo,
            "hi": hi,
            "new_lo": new_gain - self._prior_bound(),
            "new_hi": new_gain + self._prior_bound(),
            "described": settled,
            "own": own,
            "root": root,
        }

    def _bounded_choices(
        self, clients: np.ndarray, slack: float = 0.0, rho: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """The steps of ``clients`` as the pass cache settles them, each as if it were next.

        For each client: whether the bounds (:meth:`gain_bounds`) settle its step (as
        :func:`_certified_choice` does for one client), and for its prompts the cluster
        slot each goes to (``-1``: a new cluster).

        ``slack``, ``rho``: as in :meth:`gain_bounds` (a settled step is then the dense
        solver's answer as long as the clusters have moved within them).

        Returns:
            ``(settled (k,), target (rows of the clients, concatenated))``.
        """
        return self._choose(self.gain_bounds(clients, slack, rho), clients.size)

    @staticmethod
    def _choose(bounds: dict[str, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_bounded_choices` from the bounds of ``count`` clients (:meth:`gain_bounds`)."""
        rows, owner, slots, lo, hi = bounds["rows"], bounds["owner"], bounds["slots"], bounds["lo"], bounds["hi"]
        new_lo, new_hi, settled = bounds["new_lo"], bounds["new_hi"], bounds["described"].copy()
        target = np.full(rows.size, -1, dtype=np.int64)
        if slots.size == 0:
            return settled, target  # only new clusters: every prompt opens one
        line = np.arange(rows.size)
        best = np.argmax(lo, axis=1)
        best_lo = lo[line, best]
        others = hi.copy()
        others[line, best] = -np.inf
        highest_other = others.max(axis=1)
        existing = (best_lo > highest_other) & (best_lo > new_hi)
        fresh = new_lo > np.maximum(highest_other, hi[line, best])
        settled &= np.bincount(owner[~(existing | fresh)], minlength=count) == 0
        picked = np.flatnonzero(existing)
        key = np.sort(owner[picked] * slots.size + best[picked])
        twice = key[1:][key[1:] == key[:-1]] // slots.size  # two prompts of one client want one cluster
        settled[twice] = False
        target[existing] = slots[best[existing]]
        return settled, target

    def prior_of(self, rows: np.ndarray) -> np.ndarray:
        """The new-cluster gain of ``rows`` at the current state, within :meth:`_prior_bound` of the dense solver's.

        ``-0.5 (z^2 . 1/var + sum log var) - D/2 log 2 pi + logit(1/n)`` as one matrix-vector
        product per block (the dense solver sums ``z^2 / var + log var`` row by row).
        """
        cache, version = self.cache, self.state.version
        stale = rows[cache.version[rows] != version]
        if stale.size:
            inverse, log_sum = self._prior_parts()
            for start in range(0, stale.size, _PRODUCT_ROWS):
                block = stale[start : start + _PRODUCT_ROWS]
                cache.prior[block] = self._prior_from((self.z_all[block] ** 2) @ inverse, log_sum)
            cache.version[stale] = version
        return cache.prior[rows]

    def _prior_parts(self) -> tuple[np.ndarray, float]:
        """``1 / var`` ``(D,)`` and ``sum log var`` of the new-cluster prior at the current state."""
        var = 1.0 + self.mean_var(self.state.active())
        return 1.0 / var, float(np.sum(np.log(var)))

    def _prior_from(self, scaled_squares: np.ndarray, log_sum: float) -> np.ndarray:
        """The prior's gain from ``sum_d z_d^2 / var_d`` of each row."""
        return -0.5 * (scaled_squares + log_sum) - 0.5 * self.dim * _LOG_2PI + self.new_logit

    def _prior_bound(self) -> float:
        """How far :meth:`prior_of` can be from the dense solver's: two length-``D`` sums of terms below ``M^2 + 1``."""
        d = self.dim
        return _UNIT_ROUNDOFF * 8.0 * d * (d + 4) * (self.max_abs_z**2 + 2.0 + np.log(2.0))

    def _after_change(self, lost: np.ndarray, gained: np.ndarray, rescaled: np.ndarray) -> None:
        """Tell the pass cache which clusters lost or gained members, and which were re-scaled (state up to date)."""
        cache, state = self.cache, self.state
        cache.epoch += 1
        if cache.column.size < state.capacity:
            extra = state.capacity - cache.column.size
            cache.column = np.concatenate([cache.column, np.full(extra, -1, dtype=np.int64)])
        touched = np.unique(np.concatenate([lost, gained]))
        if not rescaled.size and state.members[touched].all() and (cache.column[gained] >= 0).all():
            # (the common case: members moved between clusters that keep their columns)
            cols = cache.column[touched]
            cols = cols[cols >= 0]
            if cols.size:
                self._record_shift(cols)
            return
        emptied = touched[state.members[touched] == 0]
        dead = cache.column[emptied]
        cache.slot[dead[dead >= 0]] = -1
        if emptied.size:
            cache.structure += 1
        cache.column[emptied] = -1
        fresh = np.unique(np.concatenate([rescaled, gained[cache.column[gained] < 0]]))
        moved = np.setdiff1d(touched, np.concatenate([emptied, fresh]))
        cols = cache.column[moved]
        cols = cols[cols >= 0]
        if cols.size:
            self._record_shift(cols)
        self.add_columns(fresh)

    def _record_shift(self, cols: np.ndarray) -> None:
        """``shift`` of the live columns ``cols``: how far their clusters' centres are from the columns' now."""
        cache = self.cache
        offset = self.state.centres(cache.slot[cols]) - cache.centre[cols]
        # the distance, rounded up: its own rounding (any order of the sum) is far below the bound E
        squared = np.einsum("kd,kd,kd->k", offset, offset, cache.inv_var[cols])
        cache.shift[cols] = np.sqrt(squared) * (1.0 + 1e-12) + 1e-300

    def _move(self, t: int, target: np.ndarray) -> np.ndarray:
        """Apply client ``t``'s certified step: prompt ``p`` to cluster slot ``target[p]`` (``-1``: a new cluster).

        The same state operations, in the same order, as :meth:`assign_client`'s exact step
        with that answer (the client's clusters keep other members, so none is kept alone).
        """
        z, w, own = self.z[t], self.w[t], self.assign[t]
        placed = own >= 0
        state = self.state
        if placed.any():
            state.add(own[placed], z[placed], w[placed], sign=-1.0)
        chosen = target.copy()
        fresh_rows = np.flatnonzero(target < 0)
        if fresh_rows.size:
            chosen[fresh_rows] = state.free_slots(fresh_rows.size)[: fresh_rows.size]
        state.add(chosen, z, w)
        if fresh_rows.size:
            self.refresh_nets(chosen[fresh_rows])
        self.assign[t][:] = chosen
        return chosen[fresh_rows]

    def assign_client(self, t: int, bounded: tuple[bool, np.ndarray] | None = None) -> None:
        """Re-assign client ``t``'s prompts by the Hungarian algorithm (maximising the gain).

        Columns: every existing cluster (Gaussian log-likelihood under its centre and scale
        plus its popularity logit) and one "new cluster" column per prompt (prior-predictive
        likelihood plus the popularity of a one-client cluster). The fast solver settles
        most steps from its pass cache (:meth:`_bounded_choices`; ``bounded``: its answer
        for this client, computed with the cache as it is now).
        """
        z, w = self.z[t], self.w[t]
        m = z.shape[0]
        if m == 0:
            return
        self.client_steps += 1
        state, own = self.state, self.assign[t]
        cache = self.cache
        if cache is not None:
            if bounded is None:
                settled, target = self._bounded_choices(np.array([t]))
                bounded = (bool(settled[0]), target)
            target = bounded[1] if bounded[0] else None
            cache.touches += 1
            if target is not None:
                self.bounded_steps += 1
                if np.all(own >= 0) and np.array_equal(target, own):
                    cache.queue.append(t)  # nothing changes but rounding: applied in order later
                    return
                self.flush()
                before = own.copy()
                opened = self._move(t, target)
                self.changed = True
                moved = target != before
                self._after_change(before[moved & (before >= 0)], self.assign[t][moved], opened)
                return
            self.flush()
            cache.fallback += m * int(cache.live().size)
        placed = own >= 0
        all_placed = bool(placed.all())
        term = None if self.wz is None else self.wz[t]
        if all_placed:
            state.add(own, z, w, sign=-1.0, term=term)
        elif placed.any():
            state.add(own[placed], z[placed], w[placed], sign=-1.0, term=None if term is None else term[placed])
        slots = state.active()
        if self.wz is not None:  # (every step exact: the client's z^2 and 2 z computed once)
            squared = self.z_squared[t]
            new_gain = self._new_gain(z, slots, squared)
            inv_var, scaled_centre, centre_norm, log_det = state.fresh_parts(slots)
            quad = squared @ inv_var.T - self.z_doubled[t] @ scaled_centre.T + centre_norm  # as _loglik_from_parts
            gain = (-0.5 * np.maximum(quad, 0.0) - log_det - 0.5 * self.dim * _LOG_2PI) + self.popularity_logit(slots)
        else:
            new_gain = self._new_gain(z, slots)
            gain = self._exact_gain(z, slots)
        k = slots.size
        # (a small problem is solved sooner than certified: the same answer, see _certified_choice)
        cols = _certified_choice(gain, gain, new_gain) if self.solver == "fast" and k > _DIRECT_COLUMNS else None
        if cols is None:
            full = np.full((m, k + m), _INFEASIBLE)  # every cluster, then one new-cluster column per prompt
            full[:, :k] = gain
            line = np.arange(m)
            full[line, k + line] = new_gain
            tick = time.perf_counter()
            rows, cols = linear_sum_assignment(full, maximize=True)
            self.hungarian_seconds += time.perf_counter() - tick
            self.hungarian_calls += 1
        else:
            rows = np.arange(m)
        if cols.max() < k:  # (the common case: every prompt to an existing cluster)
            chosen = slots[cols]
            state.add(chosen, z, w, term=term)
            moved = chosen != own
            if not all_placed or moved.any():
                before = own.copy()
                own[:] = chosen
                self.changed = True
                if cache is not None:
                    self._after_change(before[moved & placed], chosen[moved], chosen[:0])
            if cache is not None:
                self._maybe_rebuild()
            return
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
        state.add(chosen, z, w, term=term)
        if fresh_rows.size:
            self.refresh_nets(chosen[fresh_rows])
        moved = chosen != own
        own = own.copy()
        self.assign[t][:] = chosen
        if moved.any():
            self.changed = True
        if cache is not None:
            if moved.any() or fresh_rows.size:
                self._after_change(own[moved & placed], chosen[moved], chosen[fresh_rows])
            self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        """Rebuild the moved columns once the exact steps since the last rebuild cost as much (ski rental)."""
        cache = self.cache
        live = cache.live()
        drifted = live[cache.shift[live] > 0]
        if drifted.size and cache.fallback >= self.z_all.shape[0] * drifted.size:
            self.add_columns(cache.slot[drifted])
            cache.fallback = 0

    # -- theta-step ---------------------------------------------------------------------
    def theta_step(self) -> float:
        """Adam steps on the scale / popularity nets at the current centres; returns ``J``.

        Centres are the weighted member means (the exact maximiser of the likelihood term).
        The likelihood is evaluated from per-cluster sufficient statistics (residual sum of
        squares per dimension), so a step costs ``O(K D)``, not ``O(N D)``. The residuals
        are accumulated in client order, the order of a loop over clients (:func:`_ordered_rounds`).
        """
        state, n, dim = self.state, self.n, self.dim
        slots = state.active()
        centres_np = state.centres(slots)
        position = np.full(state.capacity, -1, dtype=np.int64)
        position[slots] = np.arange(slots.size)
        rows = position[self.labels]
        z_all = self.z_all

        def residuals(at: np.ndarray, to: int, out: np.ndarray) -> None:
            np.take(z_all, at, axis=0, out=out)
            np.subtract(out, centres_np[to], out=out)
            np.square(out, out=out)

        rss = _ordered_sums(rows, slots.size, dim, lambda at, to: (z_all[at] - centres_np[to]) ** 2, fill=residuals)
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
        """One alpha-step per client (seeded order); True if any assignment changed."""
        self.changed = False
        self.run_pass([int(t) for t in self.rng.permutation(self.n)])
        return self.changed

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
        new_index = np.full(state.capacity, -1, dtype=np.int64)
        new_index[slots] = np.arange(slots.size)
        assignments = [new_index[a] for a in self.assign]
        labels = new_index[np.concatenate(self.assign)]
        kept = np.flatnonzero(labels >= 0)

        def merged(values: np.ndarray) -> np.ndarray:
            """Weighted member means of the stacked ``values`` ``(N, X)`` under the final assignment.

            Accumulated in client order, the order of a loop over clients (:func:`_ordered_rounds`).
            """
            w_all = self.w_all

            def weighted(at: np.ndarray, _: int, out: np.ndarray) -> None:
                rows = kept[at]
                np.multiply(w_all[rows, None], values[rows], out=out)

            sums = _ordered_sums(
                labels[kept],
                slots.size,
                values.shape[1],
                lambda at, _: w_all[kept[at], None] * values[kept[at]],
                fill=weighted,
            )
            return sums / state.weight[slots, None]

        merged_keys = None if self.inputs.keys_all is None else merged(self.inputs.keys_all)
        if self.inputs.features_all is None:
            centres = state.centres(slots) * self.spread + self.offset
        else:  # clustered on features: the centres are the members' prompts, merged alike
            centres = merged(self.inputs.prompts_all)
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
            hungarian_calls=self.hungarian_calls,
            client_steps=self.client_steps,
            bounded_steps=self.bounded_steps,
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
    grad_steps: int = 50,
    min_scale: float = 0.02,
    seed: int = 0,
    solver: str = "fast",
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
        grad_steps: Adam steps per theta-step (run config ``align-theta-steps``). With 10
            (the budget before issue 29) the learned per-cluster scales were still in
            transit after a theta-step, some overshooting to ``min_scale``, and clusters
            whose scale sat at the floor split (planted ``usage`` profiles: ARI 0.78);
            50 bring them to the members' spread.
        min_scale: lower bound of the learned scale, in standardised units.
        seed: makes client order and net initialisation deterministic. The alignment
            runs on one torch thread (:func:`~fedprime_core.devices.single_thread`), so
            the answer does not depend on the caller's thread count either.
        solver: ``"fast"`` (gains of a sweep in one blocked product, the Hungarian solve
            skipped where every prompt's best cluster is its own by a proven margin) or
            ``"dense"`` (every client step against every cluster, the reference); both give
            the same assignments and, from them, the same centres (:class:`ClusterAlignment`).

    Returns:
        :class:`AlignmentResult`.
    """
    started = time.perf_counter()
    inputs = _check_inputs(
        client_prompts, client_weights, client_keys, init_assignments, prompt_weights, client_features
    )
    with single_thread():  # the nets are small: threads only cost (devices.single_thread)
        engine = ClusterAlignment(
            inputs,
            popularity=popularity,
            hidden=hidden,
            lr=lr,
            grad_steps=grad_steps,
            min_scale=min_scale,
            seed=seed,
            solver=solver,
            in_place=True,
        )
        return engine.run(n_sweeps, max_prompts, started)
