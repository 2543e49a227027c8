"""A plain, loop-based PFPT aggregation: the test oracle of :mod:`fedprime_core.method.pfpt`.

Written from the model's equations, one term at a time, the way PFPT's own
``NonparametricAgg`` computes them (a Python loop over centroids, ``torch.distributions``
per centroid, scipy's Hungarian on the full ``(m, K)`` matrix):

    J = sum_t sum_j log N(p_tj | theta_{z_tj}, diag s(theta_{z_tj})^2)
      + sum_t sum_k [ c_tk log u(theta_k) + (1 - c_tk) log(1 - u(theta_k)) ]

    init: theta = all local prompts (client-major), PFPTNets(seed), initial_assignment(seed),
          Adam(scale net, popularity net, theta; lr)
    each sweep, schedule "per-client" (PFPT's NonparametricAgg.forward, one Adam step per
          client per sweep): for every client t in turn, its cost matrix
          cost_t[j, k] = log N(p_tj | theta_k, s_k) + log u_k - log(1 - u_k)
          from the current parameters, grad_steps Adam steps on -J_t (client t's terms of J),
          then z_t = argmax_z cost_t (the costs from before the step, as PFPT's code has them);
    each sweep, schedule "per-sweep" (the block form): grad_steps Adam steps on -J with z
          fixed; then for every client z_t = argmax_z cost_t with the new parameters.

(Until issue 26 the oracle encoded only the block form, which was then the module's only
schedule; PFPT's code takes the per-client steps, which is now the default.)

Only the starting point (the networks' seeded weights and the random initial assignment)
is taken from the module under test, so both start from the same draw; every objective
term, gradient, cost and assignment is computed here independently.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.distributions import Bernoulli, Normal

from fedprime_core.method.pfpt import PFPTNets, initial_assignment


def _scale(nets: PFPTNets, centroid: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(nets.scale(centroid))


def _popularity(nets: PFPTNets, centroid: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(nets.popularity(centroid))[0]


def loop_objective(prompts: torch.Tensor, theta: torch.Tensor, nets: PFPTNets, z: list[list[int]]) -> torch.Tensor:
    """``J`` by loops over clients, local prompts and centroids."""
    n, m, _ = prompts.shape
    total = torch.zeros((), dtype=prompts.dtype)
    for t in range(n):
        for j in range(m):
            k = z[t][j]
            total = total + Normal(theta[k], _scale(nets, theta[k])).log_prob(prompts[t, j]).sum()
    for k in range(theta.shape[0]):
        u = _popularity(nets, theta[k])
        for t in range(n):
            selected = torch.tensor(1.0 if k in z[t] else 0.0, dtype=prompts.dtype)
            total = total + Bernoulli(probs=u).log_prob(selected)
    return total


def loop_cost(prompts: torch.Tensor, t: int, theta: torch.Tensor, nets: PFPTNets) -> np.ndarray:
    """``(m, K)`` gain of assigning client ``t``'s prompts to every centroid, one centroid at a time."""
    m = prompts.shape[1]
    cost = np.zeros((m, theta.shape[0]))
    with torch.no_grad():
        for k in range(theta.shape[0]):
            normal = Normal(theta[k], _scale(nets, theta[k]))
            u = _popularity(nets, theta[k])
            for j in range(m):
                cost[j, k] = float(normal.log_prob(prompts[t, j]).sum() + torch.log(u) - torch.log(1 - u))
    return cost


def _solve(cost: np.ndarray, row: list[int]) -> None:
    rows, cols = linear_sum_assignment(cost, maximize=True)
    for r, c in zip(rows, cols):
        row[r] = int(c)


def loop_pfpt(
    local_prompts: np.ndarray,
    *,
    n_sweeps: int,
    grad_steps: int = 1,
    hidden: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    schedule: str = "per-client",
) -> tuple[np.ndarray, np.ndarray, list[float], int]:
    """Run the alternating maximisation with loops.

    Returns:
        ``(theta, z, trace, steps)``: all ``K`` centroids ``(K, D)``, the final assignment
        ``(n, m)`` (centroid index of each local prompt), ``J`` after every sweep and the
        number of Adam steps taken (counted here, one per ``optimiser.step()`` call).
    """
    prompts = torch.as_tensor(local_prompts, dtype=torch.float64)
    n, m, dim = prompts.shape
    theta = nn.Parameter(prompts.reshape(n * m, dim).clone())
    nets = PFPTNets(dim, hidden, seed, torch.float64)
    optimiser = torch.optim.Adam([*nets.scale.parameters(), *nets.popularity.parameters(), theta], lr=lr)
    z = initial_assignment(n, m, seed).tolist()
    trace, steps = [], 0
    for _ in range(n_sweeps):
        if schedule == "per-client":
            for t in range(n):
                cost = loop_cost(prompts, t, theta, nets)
                for _ in range(grad_steps):
                    optimiser.zero_grad()
                    (-loop_objective(prompts[t : t + 1], theta, nets, [z[t]])).backward()
                    optimiser.step()
                    steps += 1
                _solve(cost, z[t])
        elif schedule == "per-sweep":
            for _ in range(grad_steps):
                optimiser.zero_grad()
                (-loop_objective(prompts, theta, nets, z)).backward()
                optimiser.step()
                steps += 1
            for t in range(n):
                _solve(loop_cost(prompts, t, theta, nets), z[t])
        else:
            raise ValueError(schedule)
        with torch.no_grad():
            trace.append(float(loop_objective(prompts, theta, nets, z)))
    return theta.detach().numpy(), np.asarray(z, dtype=np.int64), trace, steps
