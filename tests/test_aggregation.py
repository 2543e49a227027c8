"""Planted-answer tests of the prompt aggregators."""

from __future__ import annotations

import numpy as np
import pytest

from fedprime_core.method.aggregation import align_prompts, fedavg
from fedprime_core.metrics import adjusted_rand_index


def planted(num_clients: int, num_centres: int = 8, dim: int = 96, noise: float = 0.08, seed: int = 0):
    """Prompts around known centres; each client holds a random subset in random order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_centres, dim))
    prompts, truth, weights = [], [], []
    for _ in range(num_clients):
        m = int(rng.integers(num_centres // 2, num_centres + 1))
        which = rng.permutation(num_centres)[:m]
        prompts.append(centres[which] + noise * rng.normal(size=(m, dim)))
        truth.append(which)
        weights.append(float(rng.integers(20, 200)))
    return centres, prompts, truth, weights


def no_shared_cluster_within_client(assignments: list[np.ndarray]) -> bool:
    return all(len(set(a[a >= 0].tolist())) == int((a >= 0).sum()) for a in assignments)


def pfnm_align(prompts, weights, seed):
    """The engine with PFNM-style empirical popularity, built from scratch (no warm start)."""
    return align_prompts(prompts, weights, n_sweeps=50, popularity="empirical", seed=seed)


@pytest.mark.parametrize("aggregate", [align_prompts, pfnm_align], ids=["fedprime", "pfnm-empirical"])
def test_planted_clusters_are_recovered(aggregate):
    centres, prompts, truth, weights = planted(num_clients=12)
    result = aggregate(prompts, weights, seed=3)
    predicted = np.concatenate(result.assignments)
    assert adjusted_rand_index(predicted, np.concatenate(truth)) >= 0.95
    assert no_shared_cluster_within_client(result.assignments)
    assert result.centres.shape == (len(centres), prompts[0].shape[1])
    # Every recovered centre sits on its planted centre, not between two of them.
    for cluster in range(len(result.centres)):
        members = np.concatenate([t[a == cluster] for t, a in zip(truth, result.assignments)])
        assert len(set(members.tolist())) == 1
        assert np.linalg.norm(result.centres[cluster] - centres[members[0]]) < 0.1 * np.linalg.norm(centres[members[0]])


def test_fedavg_by_position_mixes_the_planted_clusters():
    """The control: averaging permuted prompts by position lands between clusters."""
    centres, prompts, truth, weights = planted(num_clients=12)
    width = min(p.shape[0] for p in prompts)
    averaged = fedavg([{"p": p[:width]} for p in prompts], weights)["p"]
    nearest = np.min(np.linalg.norm(averaged[:, None] - centres[None], axis=-1), axis=1)
    typical = np.linalg.norm(centres, axis=1).mean()
    assert np.all(nearest > 0.3 * typical)  # every position-averaged prompt is far from every centre
    aligned = align_prompts(prompts, weights, seed=0).centres
    aligned_nearest = np.min(np.linalg.norm(aligned[:, None] - centres[None], axis=-1), axis=1)
    assert np.all(aligned_nearest < 0.1 * typical)


def test_alignment_is_deterministic_for_a_seed():
    _, prompts, _, weights = planted(num_clients=6, noise=0.5)
    a = align_prompts(prompts, weights, seed=11)
    b = align_prompts(prompts, weights, seed=11)
    assert np.array_equal(a.centres, b.centres)
    assert all(np.array_equal(x, y) for x, y in zip(a.assignments, b.assignments))
    assert a.objective == b.objective


def test_keys_travel_with_their_prompts():
    centres, prompts, truth, weights = planted(num_clients=10)
    key_table = np.random.default_rng(5).normal(size=(len(centres), 16))
    keys = [key_table[t] for t in truth]
    result = align_prompts(prompts, weights, client_keys=keys, seed=0)
    for cluster in range(len(result.centres)):
        members = np.concatenate([t[a == cluster] for t, a in zip(truth, result.assignments)])
        np.testing.assert_allclose(result.keys[cluster], key_table[members[0]], atol=1e-5)


def test_warm_start_from_positions_splits_diverged_prompts():
    """Clients start from one global pool; a prompt that drifted to another pattern splits off."""
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(5, 32))
    prompts, positions = [], []
    for client in range(8):
        local = pool + 0.05 * rng.normal(size=pool.shape)
        if client % 2 == 0:  # half the clients repurposed global prompt 0 for something else
            local[0] = pool[0] + 3.0 * rng.normal(size=32)
        prompts.append(local)
        positions.append(np.arange(5))
    result = align_prompts(prompts, [1.0] * 8, init_assignments=positions, seed=0)
    assert no_shared_cluster_within_client(result.assignments)
    # Positions 1..4 stay merged across all clients; position 0 of the drifted clients does not.
    for pos in range(1, 5):
        assert len({int(a[pos]) for a in result.assignments}) == 1
    drifted = {int(result.assignments[c][0]) for c in range(0, 8, 2)}
    kept = {int(result.assignments[c][0]) for c in range(1, 8, 2)}
    assert len(kept) == 1 and not drifted & kept


def test_max_prompts_bounds_the_output_and_keeps_the_most_popular():
    centres, prompts, truth, weights = planted(num_clients=10, num_centres=12)
    result = align_prompts(prompts, weights, max_prompts=5, seed=0)
    assert result.centres.shape[0] == 5
    assert result.num_dropped == 7
    assert np.all(np.diff(result.cluster_sizes) <= 0)
    counts = np.bincount(np.concatenate(truth), minlength=12)
    assert result.cluster_sizes.tolist() == sorted(counts.tolist(), reverse=True)[:5]
    assert no_shared_cluster_within_client(result.assignments)
    assert all(((a >= -1) & (a < 5)).all() for a in result.assignments)


def test_single_client_keeps_its_prompts():
    prompts = [np.random.default_rng(0).normal(size=(4, 8))]
    result = align_prompts(prompts, [3.0], init_assignments=[np.arange(4)], seed=0)
    assert sorted(result.assignments[0].tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(np.sort(result.centres, axis=0), np.sort(prompts[0], axis=0), atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "at least one client"),
        ([np.zeros((2, 3)), np.zeros((2, 4))], "one D"),
        ([np.full((2, 3), np.nan)], "NaN"),
    ],
)
def test_bad_inputs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        align_prompts(bad)


def test_bad_weights_and_positions_are_refused():
    prompts = [np.zeros((2, 3)), np.ones((2, 3))]
    with pytest.raises(ValueError, match="positive"):
        align_prompts(prompts, [1.0, -1.0])
    with pytest.raises(ValueError, match="distinct"):
        align_prompts(prompts, init_assignments=[np.array([0, 0]), np.array([0, 1])])


def test_fedavg_weights_and_checks():
    a = {"w": np.array([0.0, 2.0]), "b": np.array([1.0])}
    b = {"w": np.array([4.0, 6.0]), "b": np.array([3.0])}
    out = fedavg([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [3.0, 5.0])
    np.testing.assert_allclose(out["b"], [2.5])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="shapes"):
        fedavg([a, {"w": np.zeros(3), "b": np.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="no array"):
        fedavg([a, {"w": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        fedavg([a, b], [0, 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_a_clients_prompts_stay_in_distinct_clusters_when_some_open_new_ones(seed):
    # Regression: a prompt alone in a cluster opened during the alignment keeps it when it
    # stays alone; another prompt of the same client opening a new cluster must not be handed
    # that (momentarily empty) cluster too. Both seeds put two prompts of a client in one
    # cluster before the fix, which crashed the next round's warm start (issue 17's paired run).
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 8)) * 3
    prompts = [centres[rng.integers(0, 5, 6)] + rng.normal(size=(6, 8)) * rng.uniform(0.3, 3) for _ in range(4)]
    init = [rng.permutation(8)[:6] for _ in range(4)]
    result = align_prompts(prompts, init_assignments=init, n_sweeps=5, seed=seed)
    for labels in result.assignments:
        assert len(np.unique(labels)) == labels.size  # one client's prompts: one cluster each


def test_an_unknown_popularity_rule_is_refused():
    with pytest.raises(ValueError, match="popularity must be 'learned' or 'empirical'"):
        align_prompts([np.ones((2, 3)), np.zeros((2, 3))], popularity="counted")
