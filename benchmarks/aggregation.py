"""Server-side aggregation cost: ``align_prompts`` and PFPT's ``pfpt_aggregate`` vs per-centre Python loops.

Input: ``n`` clients, each sending its ``tau = 20`` inter prompts of ``d = 768`` (ViLT-B/32's
width) and their keys. The prompts lie around ``--centres`` (default 32) shared centres,
the positions of a global pool: each client used ``tau`` distinct pool positions, and each
prompt is its centre plus Gaussian noise (local drift), in a random order. Two cases:

* **warm**: ``init_assignments`` are the pool positions each prompt started from this
  round (what ``aggregate_round`` passes for FedPrime);
* **cold**: no positions (clusters built from scratch by a sequential pass).

For each ``n`` the script reports the median wall time of ``align_prompts`` (same
arguments as ``fedprime_core.method.federated.aggregate_round``: keys, ``max_prompts=100``,
5 sweeps), the share of it spent in the Hungarian solves, the sweeps actually run (the
engine stops early at a fixed point), the clusters found and their purity against the
true centres; and the growth exponent (slope of log time against log n).

**PFPT** (``fedprime_core.method.pfpt.pfpt_aggregate``, 50 sweeps, PFPT's protocol) gets its own
input, an FL round as PFPT sees it: a global pool of ``tau = 20`` prompts drawn like PFPT's
initialisation (uniform in ``+-sqrt(6 / (3 * 32 * 32 + d))``), every client returning all
of them (the union of used rows) with a small drift (``--pfpt-drift``), each client's set in
a random order. Reported: median time, the Hungarian share, the global prompts returned and
the adjusted Rand index of the assignment against the true rows, for ``n`` up to
``--pfpt-max-n`` (PFPT's ``K = n * tau`` candidate centroids make its cost grow as ``n^2``),
against the reference scheme below run for PFPT's 50 sweeps.

Two loop implementations written here serve as the baseline:

* ``loop``: the *same objective and candidate set* as the engine (existing clusters plus
  one new-cluster column per prompt; Gaussian log-likelihood with the learned scale,
  learned popularity logit, prior-predictive new-cluster cost), computed the
  straightforward way of the reference ``NonparametricAgg``: a Python loop over candidate
  centres with ``torch.distributions.Normal(...).log_prob`` per centre, one Adam step of
  the scale / popularity nets per client per sweep, scipy's Hungarian per client. It runs
  as many sweeps as the engine did on the same input. Above ``--loop-budget`` seconds it
  stops and the total is extrapolated from the client steps done (marked in the output).
* ``reference``: the reference's own scheme, where *every* local prompt is a candidate
  centroid (``n * tau`` slots, trained by Adam), so one client step loops over
  ``n * tau`` centres. Only a few client steps are timed; the sweep time is extrapolated
  as ``n`` times the median client step.

Run: ``python benchmarks/aggregation.py [--quick] [--out]``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from _common import load_average, loglog_slope, machine, median_wall_cpu, parser, table, write_json
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

from fedprime_core.backbones.base import Backbone
from fedprime_core.method.aggregation import AlignmentResult, align_prompts
from fedprime_core.method.federated import AggregationSettings, ClientUpdate, GlobalState, validate_update
from fedprime_core.method.interpool import InterPool
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import PromptedModel, PromptSettings, trainable_state
from fedprime_core.method.pfpt import pfpt_aggregate
from fedprime_core.metrics import adjusted_rand_index

TAU, DIM, MAX_PROMPTS, SWEEPS, PFPT_SWEEPS = 20, 768, 100, 5, 50
_INFEASIBLE = -1.0e30


# ---------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------
def make_round(
    n: int, centres: int = 32, tau: int = TAU, dim: int = DIM, noise: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """One round of client uploads around shared centres (see the module docstring).

    Centres are drawn like fresh prompts (uniform in [-1, 1], as ``PromptPool`` initialises
    them); ``noise`` is the per-coordinate std of each client's drift.
    """
    if tau > centres:
        raise ValueError("each client uses tau distinct pool positions: need centres >= tau")
    rng = np.random.default_rng(seed)
    pool = rng.uniform(-1.0, 1.0, (centres, dim))
    pool_keys = rng.uniform(-1.0, 1.0, (centres, dim))
    prompts, keys, positions = [], [], []
    for _ in range(n):
        pos = rng.choice(centres, tau, replace=False)  # random order: prompts arrive permuted
        prompts.append(pool[pos] + noise * rng.standard_normal((tau, dim)))
        keys.append(pool_keys[pos] + noise * rng.standard_normal((tau, dim)))
        positions.append(pos)
    weights = rng.integers(50, 500, n).astype(np.float64)  # client sample counts
    return {
        "prompts": prompts,
        "keys": keys,
        "positions": positions,
        "weights": weights,
        "centres": centres,
        "pool": pool,
        "pool-keys": pool_keys,
    }


def clustering_quality(assignments: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, Any]:
    """Clusters found and purity (share of prompts in their cluster's majority centre)."""
    labels: dict[int, list[int]] = {}
    for a, t in zip(assignments, truth):
        for q, c in zip(np.asarray(a).tolist(), np.asarray(t).tolist()):
            if q >= 0:
                labels.setdefault(q, []).append(c)
    total = sum(len(v) for v in labels.values())
    majority = sum(max(np.bincount(v)) for v in labels.values())
    return {"clusters": len(labels), "purity": round(majority / max(total, 1), 4)}


# ---------------------------------------------------------------------------------------
# The engine under test
# ---------------------------------------------------------------------------------------
def run_engine(data: dict[str, Any], kind: str, sweeps: int | None = None) -> AlignmentResult:
    common = dict(client_keys=data["keys"], max_prompts=MAX_PROMPTS, seed=1)
    init = data["positions"] if kind == "warm" else None
    return align_prompts(data["prompts"], data["weights"], init_assignments=init, n_sweeps=sweeps or SWEEPS, **common)


# ---------------------------------------------------------------------------------------
# PFPT
# ---------------------------------------------------------------------------------------
def make_pfpt_round(n: int, tau: int = TAU, dim: int = DIM, drift: float = 0.002, seed: int = 0) -> dict[str, Any]:
    """An FL round as PFPT's server sees it (module docstring): ``(n, tau, dim)`` sets and the true rows."""
    rng = np.random.default_rng(seed)
    bound = float(np.sqrt(6.0 / (3 * 32 * 32 + dim)))
    pool = rng.uniform(-bound, bound, (tau, dim))
    truth = np.stack([rng.permutation(tau) for _ in range(n)])
    return {"prompts": pool[truth] + drift * rng.standard_normal((n, tau, dim)), "truth": truth}


def bench_pfpt(data: dict[str, Any], reps: int, schedule: str = "per-client") -> dict[str, Any]:
    seconds, times, cpu, result = median_wall_cpu(
        lambda: pfpt_aggregate(
            data["prompts"], n_sweeps=PFPT_SWEEPS, max_prompts=MAX_PROMPTS, seed=1, schedule=schedule
        ),
        reps,
    )
    # Where the centroids end up: PFPT's Adam moves them with every network's gradient, not only
    # towards their members; compare with how far the members lie from their own mean.
    flat, labels = data["prompts"].reshape(-1, data["prompts"].shape[-1]), result.assignments.ravel()
    offsets, spreads = [], []
    for k in range(result.prompts.shape[0]):
        members = flat[labels == k]
        offsets.append(np.linalg.norm(result.prompts[k] - members.mean(0)))
        spreads.append(np.linalg.norm(members - members.mean(0), axis=1).mean())
    return {
        "schedule": schedule,
        "adam-steps": result.adam_steps,
        "median-seconds": seconds,
        "median-cpu-seconds": cpu,
        "times": [round(x, 4) for x in times],
        "hungarian-share": result.hungarian_seconds / result.total_seconds,
        "sweeps-run": len(result.objective_trace),
        "global-prompts": int(result.prompts.shape[0]),
        "ari": round(adjusted_rand_index(labels, data["truth"].ravel()), 4),
        "centroid-to-member-mean": round(float(np.mean(offsets)), 4),
        "member-spread": round(float(np.mean(spreads)), 4),
        "prompt-norm": round(float(np.linalg.norm(flat, axis=1).mean()), 4),
    }


# ---------------------------------------------------------------------------------------
# Baseline 1: the same objective, computed per candidate centre in a Python loop
# ---------------------------------------------------------------------------------------
class LoopNets(nn.Module):
    """Scale net ``D -> 128 -> D`` and popularity net ``D -> 128 -> 1``, started as the engine's."""

    def __init__(self, dim: int, hidden: int = 128, min_scale: float = 0.02, seed: int = 1) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.scale = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
            self.pop = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.scale[2].weight.mul_(0.1)
            self.scale[2].bias.fill_(3.0)
        self.min_scale = min_scale

    def sigma(self, centre: torch.Tensor) -> torch.Tensor:
        return self.min_scale + (1.0 - self.min_scale) * torch.sigmoid(self.scale(centre))

    def popularity(self, centre: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.pop(centre)).clamp(1e-4, 1 - 1e-4).view(())


class BudgetExceeded(Exception):
    pass


def loop_align(
    prompts: list[np.ndarray],
    weights: np.ndarray,
    init: list[np.ndarray] | None,
    n_sweeps: int,
    budget: float = float("inf"),
    seed: int = 1,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """The engine's objective, the reference's way: loop over centres, one Adam step per client.

    Returns the wall time (measured, or extrapolated from the client steps done when
    ``budget`` seconds run out), the client steps done and planned, and the assignments.
    """
    start = time.perf_counter()
    n = len(prompts)
    stacked = np.concatenate(prompts)
    offset = stacked.mean(axis=0)
    spread = float(np.sqrt(np.mean((stacked - offset) ** 2))) or 1.0
    z = [torch.from_numpy(((p - offset) / spread).astype(np.float32)) for p in prompts]
    w = weights / weights.mean()
    dim = stacked.shape[1]
    nets = LoopNets(dim, seed=seed)
    optimiser = torch.optim.Adam(nets.parameters(), lr=lr)
    sums: dict[int, torch.Tensor] = {}
    mass: dict[int, float] = {}
    members: dict[int, int] = {}
    assign = [[-1] * p.shape[0] for p in prompts]
    rng = np.random.default_rng(seed)
    new_logit = float(np.log(1.0 / max(n, 2)) - np.log1p(-1.0 / max(n, 2)))
    counter = {"steps": 0, "next": 0}
    planned = n * n_sweeps + (n if init is None else 0)

    def add(t: int, p: int, q: int, sign: float) -> None:
        if q not in sums:
            sums[q], mass[q], members[q] = torch.zeros(dim), 0.0, 0
        sums[q] += sign * float(w[t]) * z[t][p]
        mass[q] += sign * float(w[t])
        members[q] += int(sign)
        if members[q] == 0:
            del sums[q], mass[q], members[q]

    def client_step(t: int) -> None:
        if time.perf_counter() - start > budget:
            raise BudgetExceeded
        m = z[t].shape[0]
        for p, q in enumerate(assign[t]):
            if q >= 0:
                add(t, p, q, -1.0)
        active = list(sums)
        used = set(assign[t])
        columns, pop_logits, terms = [], [], []
        variance = torch.zeros(dim)
        for q in active:  # the per-candidate-centre loop
            centre = (sums[q] / mass[q]).view(1, -1)
            sigma = nets.sigma(centre)
            loglik = Independent(Normal(centre, sigma), 1).log_prob(z[t])  # (m,)
            u = nets.popularity(centre)
            columns.append(loglik)
            pop_logits.append(torch.log(u) - torch.log1p(-u))
            variance += sigma.detach().pow(2).view(-1)
            terms.append(Bernoulli(probs=u).log_prob(torch.tensor(1.0 if q in used else 0.0)))
            terms += [loglik[p] for p, a in enumerate(assign[t]) if a == q]
        if terms:  # one Adam step on this client's share of J
            optimiser.zero_grad()
            (-torch.stack(terms).sum()).backward()
            optimiser.step()
        variance = variance / len(active) if active else torch.ones(dim)
        prior = Independent(Normal(torch.zeros(dim), torch.sqrt(1.0 + variance)), 1)
        new_block = np.full((m, m), _INFEASIBLE)
        for p in range(m):
            new_block[p, p] = float(prior.log_prob(z[t][p])) + new_logit
        if active:
            gain = (torch.stack(columns, 1) + torch.stack(pop_logits)).detach().numpy().astype(np.float64)
            gain = np.concatenate([gain, new_block], axis=1)
        else:
            gain = new_block
        rows, cols = linear_sum_assignment(gain, maximize=True)
        for p, c in zip(rows, cols):
            if c < len(active):
                q = active[c]
            else:
                q = counter["next"]  # a fresh cluster id (ids are never reused)
                counter["next"] += 1
            assign[t][p] = q
            add(t, p, q, 1.0)
        counter["steps"] += 1

    extrapolated = False
    setup = 0.0
    try:
        if init is not None:
            for t, positions in enumerate(init):
                for p, q in enumerate(positions.tolist()):
                    assign[t][p] = q
                    add(t, p, q, 1.0)
            counter["next"] = max(sums) + 1
        setup = time.perf_counter() - start
        if init is None:
            for t in rng.permutation(n):
                client_step(int(t))
        for _ in range(n_sweeps):
            for t in rng.permutation(n):
                client_step(int(t))
    except BudgetExceeded:
        extrapolated = True
    elapsed = time.perf_counter() - start
    # Extrapolate the client steps only; the set-up (standardising, the warm start) is measured.
    seconds = setup + (elapsed - setup) * planned / max(counter["steps"], 1) if extrapolated else elapsed
    return {
        "seconds": seconds,
        "extrapolated": extrapolated,
        "client-steps-done": counter["steps"],
        "client-steps-planned": planned,
        "assignments": [np.asarray(a) for a in assign],
    }


# ---------------------------------------------------------------------------------------
# Baseline 2: the reference's scheme (every local prompt is a candidate centroid)
# ---------------------------------------------------------------------------------------
def reference_client_step_seconds(prompts: list[np.ndarray], clients_to_time: int, seed: int = 1) -> list[float]:
    """Wall time of ``clients_to_time`` client steps of the reference's alternating loop.

    As in the reference ``NonparametricAgg.forward``: ``n * tau`` centroid slots (an Adam
    parameter initialised with all local prompts), random initial one-hot assignments; a
    client step loops over every slot for the Gaussian term and again for the Bernoulli
    term, takes one Adam step and solves a ``tau x (n * tau)`` Hungarian problem.
    """
    n = len(prompts)
    local = [torch.from_numpy(p.astype(np.float32)) for p in prompts]
    slots = sum(p.shape[0] for p in prompts)
    dim = local[0].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cov_net = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, dim), nn.Sigmoid())
        bern_net = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid())
    centroids = nn.Parameter(torch.cat(local).clone())
    optimiser = torch.optim.Adam([*cov_net.parameters(), *bern_net.parameters(), centroids])
    rng = np.random.default_rng(seed)
    onehot = []
    for p in prompts:
        zt = np.zeros((p.shape[0], slots), dtype=np.float32)
        zt[np.arange(p.shape[0]), rng.permutation(slots)[: p.shape[0]]] = 1.0
        onehot.append(zt)
    times = []
    for t in range(min(clients_to_time, n)):
        start = time.perf_counter()
        zt = torch.from_numpy(onehot[t])
        used = zt.sum(0)
        optimiser.zero_grad()
        lik, gauss_cols = torch.zeros(()), []
        for i in range(slots):
            mean_i = centroids[i].view(1, -1)
            lp = Independent(Normal(mean_i, cov_net(mean_i)), 1).log_prob(local[t])
            gauss_cols.append(lp)
            lik = lik + (zt[:, i] * lp).sum()
        pop_cols = []
        for i in range(slots):
            prob_i = bern_net(centroids[i].view(1, -1)).view(())
            lp = Bernoulli(probs=prob_i).log_prob(used[i] * torch.ones(zt.shape[0]))
            pop_cols.append(lp)
            lik = lik + (zt[:, i] * lp).sum()
        (-lik).backward()
        optimiser.step()
        cost = (torch.stack(gauss_cols) + torch.stack(pop_cols)).t().detach().numpy()
        rows, cols = linear_sum_assignment(cost, maximize=True)
        onehot[t][:] = 0.0
        onehot[t][rows, cols] = 1.0
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------
# The whole server-side round: validate_update + aggregate_round on ViLT-B/32-sized states
# ---------------------------------------------------------------------------------------
class _ShapeOnlyBackbone(Backbone):
    """A backbone that only fixes the width (768) and depth, so the real model builds its trainable parts."""

    def __init__(self, dim: int = DIM, layers: int = 12) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = dim, layers

    def embed(self, batch):  # pragma: no cover - never run
        raise NotImplementedError

    def run_layer(self, index, hidden, attn_mask):  # pragma: no cover - never run
        raise NotImplementedError

    def final_norm(self, hidden):  # pragma: no cover - never run
        raise NotImplementedError

    def token_scale(self) -> float:
        return 0.05  # about BERT's word embedding RMS


def make_round_updates(data: dict[str, Any], seed: int = 0) -> tuple[GlobalState, list[ClientUpdate]]:
    """ViLT-B/32-sized fedprime global state and one ``ClientUpdate`` per client of ``data``.

    The global inter pool holds the ``centres`` pool prompts; client ``t``'s ``tau`` slots
    hold the clusters at ``positions[t]`` (as the server recorded them when it sent the
    pool), and it returns its drifted copies of them, every one used; every averaged array
    (intra pool, keys, query maps, pooler, head) is perturbed.
    """
    spec = method_spec("fedprime")
    model = PromptedModel(_ShapeOnlyBackbone(), spec, 8, PromptSettings(tau=TAU, kappa=5), seed=0)
    state = trainable_state(model)
    size = data["centres"]
    pool = InterPool(
        ids=np.arange(size),
        prompts=data["pool"][:, None, :].astype(np.float32),
        keys=data["pool-keys"].astype(np.float32),
        popularity=np.full(size, 0.5),
        next_id=size,
        slots={str(t): np.asarray(pos) for t, pos in enumerate(data["positions"])},
        tau=TAU,
    )
    glob = GlobalState(spec, state, inter_pool=pool)
    rng = np.random.default_rng(seed)
    updates = []
    for t, (p, k) in enumerate(zip(data["prompts"], data["keys"])):
        local = {
            name: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
            for name, v in glob.arrays.items()
            if name not in ("pools.inter.prompts", "pools.inter.keys")
        }
        local["pools.inter.prompts"] = p[:, None, :].astype(np.float32)
        local["pools.inter.keys"] = k.astype(np.float32)
        usage = {"intra": rng.integers(0, 50, TAU), "inter": rng.integers(1, 50, TAU)}
        usage["intra"][0] += 1
        updates.append(ClientUpdate(local, int(data["weights"][t]), usage, str(t)))
    return glob, updates


def server_round(glob: GlobalState, updates: list[ClientUpdate]) -> dict[str, Any]:
    """What ``FedPrimeStrategy.aggregate_train`` computes: validate every reply, then aggregate.

    Works on a copy of ``glob``, so repeated timings aggregate the same round.
    """
    glob = GlobalState(glob.spec, glob.arrays, glob.inter_pool, glob.inter_merge)
    expected = glob.expected_shapes()
    start = time.perf_counter()
    for update in updates:
        reasons = validate_update(update, expected, glob.spec.pools, 1e4)
        if reasons:
            raise RuntimeError(f"benchmark produced an invalid update: {reasons}")
    validated = time.perf_counter() - start
    report = glob.aggregate(updates, AggregationSettings(max_prompts=MAX_PROMPTS, sweeps=SWEEPS))
    return {**report, "validate-seconds": validated}


# ---------------------------------------------------------------------------------------
# Alignment at scale, every regime (--regimes)
# ---------------------------------------------------------------------------------------
#: The regimes of ``aggregate_inter_pool``'s alignment: where it starts and what it compares.
REGIMES: dict[str, dict[str, str]] = {
    "warm": {"start": "warm", "on": "prompt"},  # inter-init=shared, align-start=warm (the default)
    "cold": {"start": "cold", "on": "prompt"},  # align-start=cold: from scratch every round
    "independent": {"start": "independent", "on": "prompt"},  # inter-init=independent: half never merged
    "delta": {"start": "warm", "on": "delta"},  # align-on=delta
    "usage": {"start": "warm", "on": "usage"},  # align-on=usage: 3-dim retrieval profiles
    "usage-cold": {"start": "cold", "on": "usage"},
}
#: The goal of issue 29 on the 2-core machine: seconds for 1,000 and for 10,000 clients, and the least ARI.
GOAL_SECONDS, GOAL_MIN_ARI = {1000: 1.0, 10000: 15.0}, 0.95


def simplex_grid(count: int, side: int = 8) -> np.ndarray:
    """``count`` points of a triangular grid on the 2-simplex (usage profiles over 3 missing patterns)."""
    points = [(i, j, side - 1 - i - j) for i in range(side) for j in range(side - i)]
    if count > len(points):
        raise ValueError(f"the grid holds {len(points)} profiles, fewer than {count}")
    return np.asarray(points[:count], dtype=np.float64) / (side - 1)


def make_scale_round(
    n: int,
    centres: int = 32,
    tau: int = TAU,
    dim: int = DIM,
    noise: float = 0.1,
    moved: float = 0.05,
    fresh: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """A round as ``aggregate_inter_pool`` hands it to ``align_prompts``, with the planted truth.

    Every client holds ``tau`` slots (distinct pool positions) and used a ragged subset of
    them (``m_t`` uniform in ``tau/2 .. tau``), with usage counts as prompt weights. A used
    prompt is its true centre plus Gaussian noise (``noise`` per coordinate, centres uniform
    in ``[-1, 1]``); with probability ``moved`` its true centre is one the client does not
    hold (the warm start is wrong for it). The same truth drives the features: ``delta``
    (each centre's change this round plus noise) and ``usage`` (each centre's retrieval
    profile, a point of a grid on the simplex, plus noise of 0.01: neighbouring profiles lie
    20 noise standard deviations apart, so they are separable; a real profile's sampling noise
    at these retrieval counts would be about 9x larger, see ``benchmarks/README.md``). ``fresh``: the share of
    clients whose prompts have no warm start in the ``independent`` regime. Arrays are
    float32 (as prompts arrive on the wire).
    """
    rng = np.random.default_rng(seed)
    pool = rng.uniform(-1.0, 1.0, (centres, dim)).astype(np.float32)
    pool_keys = rng.uniform(-1.0, 1.0, (centres, dim)).astype(np.float32)
    pool_delta = (0.01 * rng.uniform(-1.0, 1.0, (centres, dim))).astype(np.float32)
    profiles = simplex_grid(centres)
    held, truth = [], []
    for _ in range(n):
        slots = rng.choice(centres, tau, replace=False)
        used = rng.choice(tau, int(rng.integers(tau // 2, tau + 1)), replace=False)
        labels = slots[used]
        true = labels.copy()
        shift = rng.random(used.size) < moved
        if shift.any():
            spare = np.setdiff1d(np.arange(centres), slots)
            true[shift] = rng.choice(spare, int(min(shift.sum(), spare.size)), replace=False)[: int(shift.sum())]
        held.append(labels)
        truth.append(true)
    sizes = np.array([t.size for t in truth])
    flat = np.concatenate(truth)
    total = int(sizes.sum())

    def noisy(base: np.ndarray, scale: float) -> np.ndarray:
        out = base[flat]
        for start in range(0, total, 8192):
            block = out[start : start + 8192]
            block += scale * rng.standard_normal(block.shape, dtype=np.float32)
        return out

    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def split(stacked: np.ndarray) -> list[np.ndarray]:
        return [stacked[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    usage = profiles[flat] + 0.01 * rng.standard_normal((total, 3))
    fresh_clients = rng.random(n) < fresh
    return {
        "prompts": split(noisy(pool, noise)),
        "keys": split(noisy(pool_keys, noise)),
        "delta": split(noisy(pool_delta, 0.01 * noise)),
        "usage": split(usage),
        "weights": split(rng.integers(1, 50, total).astype(np.float64)),
        "warm": held,
        "independent": [np.full(h.size, -1) if f else h for h, f in zip(held, fresh_clients)],
        "truth": truth,
        "rows": total,
    }


def align_regime(data: dict[str, Any], regime: str, solver: str = "fast") -> AlignmentResult:
    """``align_prompts`` as ``aggregate_inter_pool`` calls it, in ``regime`` (module ``REGIMES``)."""
    spec = REGIMES[regime]
    init = None if spec["start"] == "cold" else data[spec["start"]]
    features = None if spec["on"] == "prompt" else data[spec["on"]]
    return align_prompts(
        data["prompts"],
        client_keys=data["keys"],
        init_assignments=init,
        prompt_weights=data["weights"],
        client_features=features,
        n_sweeps=SWEEPS,
        seed=1,
        solver=solver,
    )


def regime_child(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process (its own threads and peak memory): every regime at one ``n``."""
    import resource
    import tracemalloc

    n, reps = config["n"], config["reps"]
    if config["threads"] == 1:
        torch.set_num_threads(1)
    warm = make_scale_round(12, seed=99)
    for regime in config["regimes"]:
        align_regime(warm, regime)  # first use of torch / BLAS kernels: not timed
    data = make_scale_round(n, centres=config["centres"], noise=config["noise"], moved=config["moved"], seed=n)
    truth = np.concatenate(data["truth"])
    out: dict[str, Any] = {"n": n, "threads": config["threads"], "prompts": data["rows"], "regimes": {}}
    for regime in config["regimes"]:
        load = load_average()
        seconds, times, cpu, result = median_wall_cpu(functools.partial(align_regime, data, regime), reps)
        row = {
            "seconds": seconds,
            "cpu-seconds": cpu,
            "times": [round(t, 4) for t in times],
            "load-average": load,
            "ari": round(adjusted_rand_index(np.concatenate(result.assignments), truth), 4),
            "clusters": int(result.centres.shape[0]),
            "sweeps": len(result.objective_trace) - 1,
            "hungarian-calls": result.hungarian_calls,
            "client-steps": result.client_steps,
        }
        if config["memory"]:
            tracemalloc.start()
            align_regime(data, regime)
            row["peak-traced-mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            tracemalloc.stop()
        if n <= config["dense-max-n"]:
            tick = time.perf_counter()
            dense = align_regime(data, regime, solver="dense")
            row["dense-seconds"] = time.perf_counter() - tick
            row["dense-equal"] = all(
                np.array_equal(a, b) for a, b in zip(dense.assignments, result.assignments)
            ) and np.array_equal(dense.centres, result.centres)
        out["regimes"][regime] = row
    out["peak-rss-mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def d_threads(found: dict[Any, Any]) -> Any:
    """The thread setting a summary row of :func:`run_regimes` reports first (default threads when run)."""
    return "default" if "default" in found else 1


def run_regimes(args: Any) -> None:
    """Every regime at every ``n``, default threads and one thread, each in a child process."""
    import json
    import os
    import subprocess
    import sys

    ns = [10, 30] if args.quick else [int(x) for x in args.clients.split(",")]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; load {info['load-average-at-start']}")
    print(
        f"input: n clients x tau={TAU} slots, ragged use (tau/2..tau prompts), d={DIM}, {args.centres} planted "
        f"centres, noise {args.noise}, {args.moved:.0%} of the prompts moved off their warm start\n"
    )
    thread_settings: tuple[str | int, ...] = {"both": ("default", 1), "one": (1,), "default": ("default",)}[
        args.threads
    ]
    baseline_script = None
    if args.baseline_tree:  # the same child in another checkout (the code before a change), run alternately
        baseline_script = os.path.join(os.path.abspath(args.baseline_tree), "benchmarks", "aggregation.py")
        print(f"baseline: {baseline_script} (run before each child of this checkout, same settings)\n")

    def run_child(config: dict[str, Any], script: str) -> dict[str, Any]:
        env = dict(os.environ)
        if config["threads"] == 1:
            env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        proc = subprocess.run(
            [sys.executable, script, "--regime-child", json.dumps(config)],
            env=env,
            cwd=os.path.dirname(os.path.dirname(script)),
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"regime child {script} {config} failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT ") :])

    results: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    for n in ns:
        for threads in thread_settings:
            config = {
                "n": n,
                "threads": threads,
                "reps": 1 if args.quick or n >= 10000 else args.reps,
                "regimes": list(REGIMES),
                "centres": args.centres,
                "noise": args.noise,
                "moved": args.moved,
                "memory": threads == "default",
                "dense-max-n": 30 if args.quick else args.dense_max_n,
            }
            if baseline_script is not None:
                base = run_child({**config, "memory": False, "dense-max-n": 0}, baseline_script)
                baselines.append(base)
                for regime, r in base["regimes"].items():
                    print(
                        f"n={n:6d} {str(threads):7s} {regime:11s} {r['seconds']:8.3f} s (CPU {r['cpu-seconds']:.3f})  "
                        f"ARI {r['ari']:.4f}  baseline  load {r['load-average']}",
                        flush=True,
                    )
            child = run_child(config, os.path.abspath(__file__))
            results.append(child)
            for regime, r in child["regimes"].items():
                dense = (
                    f"  dense {r['dense-seconds']:.3f} s ({'same' if r['dense-equal'] else 'DIFFERENT'})"
                    if "dense-seconds" in r
                    else ""
                )
                peak = f"  peak {r['peak-traced-mb']} MB" if "peak-traced-mb" in r else ""
                print(
                    f"n={n:6d} {str(threads):7s} {regime:11s} {r['seconds']:8.3f} s (CPU {r['cpu-seconds']:.3f})  "
                    f"ARI {r['ari']:.4f}  clusters {r['clusters']}  sweeps {r['sweeps']}  "
                    f"hungarian {r['hungarian-calls']}/{r['client-steps']}{peak}{dense}  load {r['load-average']}",
                    flush=True,
                )
    growth: dict[str, dict[str, float | None]] = {}
    body = []
    for regime in REGIMES:
        for threads in thread_settings:
            rows = [(c["n"], c["regimes"][regime]) for c in results if c["threads"] == threads]
            xs, ys = [x for x, _ in rows], [r["seconds"] for _, r in rows]
            big = [(x, y) for x, y in zip(xs, ys) if x >= 1000]
            growth[f"{regime}/{threads}"] = {
                "all-n": loglog_slope(xs, ys),
                "n>=1000": loglog_slope([x for x, _ in big], [y for _, y in big]),
            }
        for n in ns:
            found = {c["threads"]: c["regimes"][regime] for c in results if c["n"] == n}
            d = found.get("default", found.get(1))
            o = found.get(1)
            speed = f"{d['dense-seconds'] / d['seconds']:.1f}x" if "dense-seconds" in d else "-"
            base = next(
                (b["regimes"][regime] for b in baselines if b["n"] == n and b["threads"] == d_threads(found)), None
            )
            body.append(
                [
                    regime,
                    n,
                    d["seconds"] if "default" in found else "-",
                    o["seconds"] if o is not None else "-",
                    d["cpu-seconds"],
                    base["cpu-seconds"] if base else "-",
                    f"{base['cpu-seconds'] / d['cpu-seconds']:.2f}x" if base else "-",
                    d["ari"],
                    d.get("peak-traced-mb", "-"),
                    f"{d['hungarian-calls']}/{d['client-steps']}",
                    speed,
                    " ".join(str(x) for x in (d["load-average"] or [])[:1]),
                ]
            )
    headers = ["regime", "n", "s", "s, 1 thread", "CPU s", "baseline CPU s", "speed-up (CPU)", "ARI", "peak MB"]
    print("\nalign_prompts at scale (fast solver; median wall seconds):")
    print(table([*headers, "Hungarian solves", "vs dense", "load"], body))
    print(
        "\ngrowth exponents (slope of log time vs log n; all n / n >= 1000): "
        + ", ".join(
            f"{k} {v['all-n']:.2f}/{v['n>=1000']:.2f}" if v["n>=1000"] is not None else f"{k} {v['all-n']:.2f}"
            for k, v in growth.items()
            if v["all-n"] is not None
        )
    )
    for n, limit in GOAL_SECONDS.items():
        found = [c for c in results if c["n"] == n]
        if not found:
            continue
        worst = max((c["regimes"][r]["seconds"], r, c["threads"]) for c in found for r in REGIMES)
        ari = min(c["regimes"][r]["ari"] for c in found for r in REGIMES)
        met = worst[0] <= limit and ari >= GOAL_MIN_ARI
        print(
            f"goal: {n:,} clients in <= {limit:g} s in every regime at ARI >= {GOAL_MIN_ARI}: slowest {worst[0]:.2f} s "
            f"({worst[1]}, {worst[2]} threads), lowest ARI {ari:.4f} -> {'met' if met else 'MISSED'}"
        )
    write_json(
        args.out,
        {
            "benchmark": "aggregation",
            "mode": "regimes",
            "machine": info,
            "settings": {
                "tau": TAU,
                "dim": DIM,
                "centres": args.centres,
                "noise": args.noise,
                "moved": args.moved,
                "sweeps": SWEEPS,
                "reps": args.reps,
            },
            "results": results,
            "baseline-tree": args.baseline_tree,
            "baseline-results": baselines,
            "growth-exponent": growth,
        },
    )


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def bench_engine(data: dict[str, Any], kind: str, reps: int) -> dict[str, Any]:
    run_engine(data, kind)  # warm-up (torch kernels, allocator); not timed
    seconds, times, cpu, result = median_wall_cpu(lambda: run_engine(data, kind), reps)
    return {
        "median-seconds": seconds,
        "median-cpu-seconds": cpu,
        "times": [round(x, 4) for x in times],
        "hungarian-share": result.hungarian_seconds / result.total_seconds,
        "sweeps-run": len(result.objective_trace) - 1,
        **clustering_quality(result.assignments, data["positions"]),
    }


def warm_up() -> None:
    """First use of torch.distributions / autograd / Adam imports and initialises a lot: not timed."""
    small = make_round(3, seed=3)
    loop_align(small["prompts"], small["weights"], None, 1)
    reference_client_step_seconds(small["prompts"], 1)


def pfpt_only(args: Any) -> None:
    """``--pfpt-only``: PFPT's aggregation per ``n`` and schedule, nothing else."""
    ns = [5] if args.quick else [int(x) for x in args.clients.split(",") if int(x) <= args.pfpt_max_n]
    reps = 1 if args.quick else args.reps
    schedules = ("per-client", "per-sweep") if args.pfpt_steps == "both" else (args.pfpt_steps,)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({torch.get_num_threads()} threads)")
    rows = []
    for n in ns:
        data = make_pfpt_round(n, drift=args.pfpt_drift, seed=n)
        pfpt_aggregate(data["prompts"], n_sweeps=1, seed=1)  # warm-up; not timed
        row: dict[str, Any] = {"n": n}
        for schedule in schedules:
            row[schedule] = r = bench_pfpt(data, reps, schedule)
            print(
                f"n={n:4d} pfpt {schedule:10s} {r['adam-steps']:5d} Adam steps  {r['median-seconds']:8.2f} s "
                f"(CPU {r['median-cpu-seconds']:.2f} s)  hungarian {100 * r['hungarian-share']:4.1f}%  "
                f"{n * TAU} centroids -> {r['global-prompts']} global prompts, ARI {r['ari']}, centroid "
                f"{r['centroid-to-member-mean']} from its members' mean (spread {r['member-spread']}, prompt norm "
                f"{r['prompt-norm']})",
                flush=True,
            )
        rows.append(row)
    info["load-average-at-end"] = load_average()
    write_json(
        args.out,
        {
            "benchmark": "aggregation",
            "machine": info,
            "settings": {
                "tau": TAU,
                "dim": DIM,
                "pfpt-sweeps": PFPT_SWEEPS,
                "max-prompts": MAX_PROMPTS,
                "pfpt-drift": args.pfpt_drift,
                "reps": reps,
                "schedules": list(schedules),
            },
            "pfpt-rows": rows,
        },
    )


def main() -> None:
    import json
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--regime-child":
        print("RESULT " + json.dumps(regime_child(json.loads(sys.argv[2]))), flush=True)
        return
    p = parser("aggregation", __doc__.splitlines()[0])
    p.add_argument(
        "--clients",
        default=None,
        help="comma-separated client counts n (default 10,50,100,500; with --regimes 10,100,1000,10000)",
    )
    p.add_argument("--regimes", action="store_true", help="only the alignment at scale in every regime")
    p.add_argument("--moved", type=float, default=0.05, help="--regimes: share of prompts off their warm start")
    p.add_argument("--dense-max-n", type=int, default=1000, help="--regimes: largest n also run by the dense solver")
    p.add_argument(
        "--threads", choices=("both", "one", "default"), default="both", help="--regimes: thread settings to run"
    )
    p.add_argument(
        "--baseline-tree",
        default=None,
        help="--regimes: a checkout of other code (e.g. `git worktree add /tmp/base main`) whose same child runs "
        "before each of this one's, for a speed-up measured under the same load",
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    p.add_argument("--centres", type=int, default=32, help="shared centres the prompts lie around")
    p.add_argument("--noise", type=float, default=0.1, help="per-coordinate std of each client's drift")
    p.add_argument("--loop-budget", type=float, default=10.0, help="seconds before the loop baseline extrapolates")
    p.add_argument("--reference-max-n", type=int, default=50, help="largest n at which the reference is timed")
    p.add_argument("--round-max-n", type=int, default=100, help="largest n for the whole-round timing")
    p.add_argument("--no-pfpt", action="store_true")
    p.add_argument("--pfpt-max-n", type=int, default=100, help="largest n at which PFPT is timed")
    p.add_argument("--pfpt-drift", type=float, default=0.002, help="per-coordinate drift of PFPT's client prompts")
    p.add_argument(
        "--pfpt-steps",
        default="per-client",
        choices=("per-client", "per-sweep", "both"),
        help="PFPT's Adam schedule (fedprime_core.method.pfpt); both: each, side by side",
    )
    p.add_argument("--pfpt-only", action="store_true", help="time PFPT's aggregation only (up to --pfpt-max-n)")
    args = p.parse_args()
    if args.regimes:
        args.clients = args.clients or "10,100,1000,10000"
        if args.out and Path(args.out).name == "aggregation.json":  # its own file, not over the main run's figures
            args.out = str(Path(args.out).with_name("aggregation-regimes.json"))
        run_regimes(args)
        return
    args.clients = args.clients or "10,50,100,500"
    if args.pfpt_only:
        pfpt_only(args)
        return
    ns = [5, 10] if args.quick else [int(x) for x in args.clients.split(",")]
    reps = 1 if args.quick else args.reps
    budget = 1.0 if args.quick else args.loop_budget
    ref_max = 10 if args.quick else args.reference_max_n
    pfpt_max = 5 if args.quick else args.pfpt_max_n
    round_max = 10 if args.quick else args.round_max_n
    threads = torch.get_num_threads()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({threads} threads)")
    print(f"input: tau={TAU} prompts of d={DIM} per client around {args.centres} centres, noise {args.noise}\n")
    warm_up()

    rows: list[dict[str, Any]] = []
    for n in ns:
        data = make_round(n, centres=args.centres, noise=args.noise, seed=n)
        row: dict[str, Any] = {"n": n}
        for kind in ("warm", "cold"):
            row[kind] = bench_engine(data, kind, reps)
            r = row[kind]
            print(
                f"n={n:4d} {kind:5s} {r['median-seconds']:7.3f} s (CPU {r['median-cpu-seconds']:.3f} s)  "
                f"hungarian {100 * r['hungarian-share']:4.1f}%  sweeps {r['sweeps-run']}  "
                f"clusters {r['clusters']}  purity {r['purity']}",
                flush=True,
            )
        if threads > 1:
            torch.set_num_threads(1)
            try:
                row["warm-1-thread"] = bench_engine(data, "warm", reps)
            finally:
                torch.set_num_threads(threads)
            r = row["warm-1-thread"]
            print(f"n={n:4d} warm, 1 torch thread {r['median-seconds']:7.3f} s (CPU {r['median-cpu-seconds']:.3f} s)")
        if not args.no_pfpt and n <= pfpt_max:
            pfpt_data = make_pfpt_round(n, drift=args.pfpt_drift, seed=n)
            if n == ns[0]:
                pfpt_aggregate(pfpt_data["prompts"], n_sweeps=2, seed=1)  # warm-up; not timed
            row["pfpt"] = r = bench_pfpt(
                pfpt_data, reps, "per-client" if args.pfpt_steps == "both" else args.pfpt_steps
            )
            print(
                f"n={n:4d} pfpt  {r['median-seconds']:7.3f} s (CPU {r['median-cpu-seconds']:.3f} s)  "
                f"hungarian {100 * r['hungarian-share']:4.1f}%  sweeps {r['sweeps-run']}  "
                f"{n * TAU} centroids -> {r['global-prompts']} global prompts, ARI {r['ari']}, "
                f"centroid {r['centroid-to-member-mean']} from its members' mean (spread {r['member-spread']}, "
                f"prompt norm {r['prompt-norm']})",
                flush=True,
            )
        if n <= round_max:
            glob, updates = make_round_updates(data)
            server_round(glob, updates)  # warm-up
            seconds, times, cpu, report = median_wall_cpu(functools.partial(server_round, glob, updates), reps)
            row["server-round"] = {
                "median-seconds": seconds,
                "median-cpu-seconds": cpu,
                "times": [round(x, 4) for x in times],
                "validate-seconds": report["validate-seconds"],
                "aggregate-round-seconds": report["aggregation-seconds"],
                "align-seconds": report["inter-align-seconds"],
                "fedavg-seconds": report["aggregation-seconds"] - report["inter-align-seconds"],
                "client-state-bytes": int(sum(v.nbytes for v in updates[0].state.values())),
            }
            del glob, updates
            print(
                f"n={n:4d} whole server round (validate + aggregate_round, ViLT-B/32 fedprime states): "
                f"{seconds:.3f} s (CPU {cpu:.3f} s): validate {report['validate-seconds']:.3f} s, FedAvg "
                f"{report['aggregation-seconds'] - report['inter-align-seconds']:.3f} s, "
                f"alignment {report['inter-align-seconds']:.3f} s",
                flush=True,
            )
        for kind in ("warm", "cold"):
            sweeps = row[kind]["sweeps-run"]
            init = data["positions"] if kind == "warm" else None
            loop = loop_align(data["prompts"], data["weights"], init, sweeps, budget=budget)
            quality = clustering_quality(loop.pop("assignments"), data["positions"])
            row[f"loop-{kind}"] = {**loop, **quality, "sweeps": sweeps}
            row[f"loop-{kind}"]["speedup"] = loop["seconds"] / row[kind]["median-seconds"]
            print(
                f"n={n:4d} loop-{kind} {loop['seconds']:7.3f} s{' (extrapolated)' if loop['extrapolated'] else ''}  "
                f"sweeps {sweeps}  clusters {quality['clusters']}  purity {quality['purity']}  "
                f"-> engine is {row[f'loop-{kind}']['speedup']:.1f}x faster",
                flush=True,
            )
        if n <= ref_max:
            step = reference_client_step_seconds(data["prompts"], 1)[0]
            row["reference"] = {"client-step-seconds": step, "measured": True}
            print(f"n={n:4d} reference scheme: {step:.3f} s per client step over {n * TAU} centroids", flush=True)
        rows.append(row)

    # Reference: sweep = n client steps; above --reference-max-n the step time is extrapolated
    # with the power law fitted to the measured steps.
    measured = [(r["n"], r["reference"]["client-step-seconds"]) for r in rows if "reference" in r]
    slope = loglog_slope([m[0] for m in measured], [m[1] for m in measured]) if len(measured) >= 2 else None
    for r in rows:
        if "reference" not in r:
            if slope is None:
                continue
            n0, s0 = measured[-1]
            r["reference"] = {"client-step-seconds": s0 * (r["n"] / n0) ** slope, "measured": False}
        ref = r["reference"]
        ref["candidate-centroids"] = r["n"] * TAU
        ref["sweep-seconds"] = ref["client-step-seconds"] * r["n"]
        ref[f"{SWEEPS}-sweeps-seconds"] = ref["sweep-seconds"] * SWEEPS
        ref[f"{PFPT_SWEEPS}-sweeps-seconds"] = ref["sweep-seconds"] * PFPT_SWEEPS
    growth = {
        kind: loglog_slope([r["n"] for r in rows], [r[kind]["median-seconds"] for r in rows])
        for kind in ("warm", "cold", "warm-1-thread")
        if kind in rows[0]
    }
    with_pfpt = [r for r in rows if "pfpt" in r]
    growth["pfpt"] = loglog_slope([r["n"] for r in with_pfpt], [r["pfpt"]["median-seconds"] for r in with_pfpt])
    with_round = [r for r in rows if "server-round" in r]
    growth["server-round"] = loglog_slope(
        [r["n"] for r in with_round], [r["server-round"]["median-seconds"] for r in with_round]
    )
    growth["loop-warm"] = loglog_slope([r["n"] for r in rows], [r["loop-warm"]["seconds"] for r in rows])
    growth["reference-client-step"] = slope

    print("\nalign_prompts (FedPrime: keys, max_prompts=100, 5 sweeps max), median s:")
    headers = ["n", "warm", "warm 1 thread", "hung. %", "sweeps", "cold", "hung. %", "sweeps", "clusters", "purity"]
    headers += ["whole round"]
    body = []
    for r in rows:
        line = [r["n"], r["warm"]["median-seconds"], r.get("warm-1-thread", {}).get("median-seconds", "-")]
        line += [100 * r["warm"]["hungarian-share"], r["warm"]["sweeps-run"]]
        line += [r["cold"]["median-seconds"], 100 * r["cold"]["hungarian-share"], r["cold"]["sweeps-run"]]
        line += [f"{r['warm']['clusters']}/{r['cold']['clusters']}", f"{r['warm']['purity']}/{r['cold']['purity']}"]
        line += [r["server-round"]["median-seconds"] if "server-round" in r else "-"]
        body.append(line)
    print(table(headers, body))
    print("\nvs the loop baselines (same input; 'x' = baseline time / engine time):")
    body = []
    for r in rows:
        lw, lc, ref = r["loop-warm"], r["loop-cold"], r.get("reference")
        line = [
            r["n"],
            f"{lw['seconds']:.3g}{'*' if lw['extrapolated'] else ''}",
            lw["speedup"],
            f"{lc['seconds']:.3g}{'*' if lc['extrapolated'] else ''}",
            lc["speedup"],
        ]
        if ref is not None:
            mark = "" if ref["measured"] else "**"
            line += [
                f"{ref['client-step-seconds']:.3g}{mark}",
                f"{ref['sweep-seconds']:.3g}",
                f"{ref[f'{SWEEPS}-sweeps-seconds']:.3g}",
                ref[f"{SWEEPS}-sweeps-seconds"] / r["warm"]["median-seconds"],
            ]
        else:
            line += ["-", "-", "-", "-"]
        body.append(line)
    print(
        table(
            [
                "n",
                "loop warm",
                "x",
                "loop cold",
                "x",
                "ref s/client",
                "ref s/sweep",
                f"ref {SWEEPS} sweeps",
                "x vs warm",
            ],
            body,
        )
    )
    print(
        "(* extrapolated from the client steps done within the loop budget; ** extrapolated from the measured "
        "reference steps with their fitted power law; a reference sweep is n client steps)"
    )
    if with_pfpt:
        print(f"\nPFPT (pfpt_aggregate, {PFPT_SWEEPS} sweeps, max_prompts={MAX_PROMPTS}) vs the reference scheme:")
        body = []
        for r in with_pfpt:
            p, ref = r["pfpt"], r.get("reference")
            ref_total = ref[f"{PFPT_SWEEPS}-sweeps-seconds"] if ref else None
            body.append(
                [
                    r["n"],
                    r["n"] * TAU,
                    p["median-seconds"],
                    p["median-cpu-seconds"],
                    100 * p["hungarian-share"],
                    p["global-prompts"],
                    p["ari"],
                    f"{p['centroid-to-member-mean']:.3g} / {p['member-spread']:.3g} / {p['prompt-norm']:.3g}",
                    "-" if ref_total is None else f"{ref_total:.3g}{'' if ref['measured'] else '**'}",
                    "-" if ref_total is None else ref_total / p["median-seconds"],
                ]
            )
        print("(centroid offset: L2 distance of a global prompt from the mean of its members; spread: mean L2")
        print(" distance of the members from that mean; norm: mean L2 norm of the local prompts)")
        headers = ["n", "centroids", "pfpt s", "CPU s", "hung. %", "global prompts", "ARI"]
        headers += ["centroid offset / spread / norm", "reference s", "x"]
        print(table(headers, body))
    print(
        "\ngrowth exponents (slope of log time vs log n): "
        + ", ".join(f"{k} {v:.2f}" for k, v in growth.items() if v is not None)
    )
    hundred = next((r for r in rows if r["n"] == 100), None)
    if hundred is not None:
        t = hundred["warm"]["median-seconds"]
        print(f"target: 100 clients aligned in < 2 s (warm align_prompts): {t:.2f} s -> {'met' if t < 2 else 'MISSED'}")
        if "pfpt" in hundred:
            t = hundred["pfpt"]["median-seconds"]
            print(f"        PFPT, 100 clients x 20 prompts x d 768, 50 sweeps: {t:.2f} s")
        if "server-round" in hundred:
            t = hundred["server-round"]["median-seconds"]
            print(f"        whole server round for 100 clients: {t:.2f} s -> {'met' if t < 2 else 'MISSED'}")
    write_json(
        args.out,
        {
            "benchmark": "aggregation",
            "machine": info,
            "settings": {
                "tau": TAU,
                "dim": DIM,
                "centres": args.centres,
                "noise": args.noise,
                "max-prompts": MAX_PROMPTS,
                "sweeps": SWEEPS,
                "pfpt-sweeps": PFPT_SWEEPS,
                "pfpt-max-n": pfpt_max,
                "pfpt-drift": args.pfpt_drift,
                "reps": reps,
                "loop-budget-seconds": budget,
                "reference-max-n": ref_max,
                "round-max-n": round_max,
            },
            "rows": rows,
            "growth-exponent": growth,
        },
    )


if __name__ == "__main__":
    main()
