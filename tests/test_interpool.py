"""Personalised inter pools: planted answers for content alignment, slots, popularity, resume records."""

from __future__ import annotations

import numpy as np
import pytest

from fedprime_core.method.interpool import (
    UNUSED_DECAY,
    InterPool,
    InterUpdate,
    _name_clusters,
    aggregate_inter_pool,
    assign_slots,
    own_pool,
)
from fedprime_core.metrics import entropy_bits, mutual_information_bits, specialised_share

TAU, LENGTH, DIM = 6, 1, 32


def planted_pool(seed: int = 0) -> tuple[InterPool, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TAU, LENGTH, DIM))
    keys = rng.normal(size=(TAU, DIM))
    return InterPool.initial(centres, keys), centres, keys


def permuted_round(
    pool, centres, keys, num_clients: int, seed: int = 1, noise: float = 0.05, own: bool = False, mode: str = "align"
):
    """Each client's slot p now holds planted content perm[p]: clients given the pool in slot order
    0..tau-1, or (``own``) clients that started from pools of their own (``inter-init=independent``)."""
    rng = np.random.default_rng(seed)
    updates, perms = [], []
    for client in range(num_clients):
        if own:
            pool, slots = assign_slots(pool, str(client), mode=mode, init="independent", seed=7)
            assert np.all(slots >= TAU)  # clusters of its own, not the shared ones
        else:
            pool, slots = assign_slots(pool, str(client))
            assert slots.tolist() == list(range(TAU))
        perm = rng.permutation(TAU)
        perms.append(perm)
        updates.append(
            InterUpdate(
                client=str(client),
                prompts=centres[perm] + noise * rng.normal(size=(TAU, LENGTH, DIM)),
                keys=keys[perm] + noise * rng.normal(size=(TAU, DIM)),
                usage=rng.integers(1, 50, size=TAU),
            )
        )
    return pool, updates, perms


def test_align_merges_planted_contents_held_at_different_slots_and_position_does_not():
    pool, centres, keys = planted_pool()
    pool, updates, perms = permuted_round(pool, centres, keys, num_clients=8)
    aligned, report = aggregate_inter_pool(pool, updates, mode="align", max_size=20, seed=0)
    typical = np.linalg.norm(centres.reshape(TAU, -1), axis=1).mean()
    # align: the global pool is the planted centres again, and every client's slot p now holds
    # the centre of the content it had at p (so its pool is its own, content-consistent order).
    assert aligned.size == TAU and report["inter-clusters-opened"] == 0
    distances = np.linalg.norm(aligned.prompts.reshape(TAU, 1, -1) - centres.reshape(1, TAU, -1), axis=-1)
    assert np.all(distances.min(axis=1) < 0.1 * typical)
    # A used prompt counts as rematched when the cluster of its content is not the one its slot started in.
    id_of_content = aligned.ids[distances.argmin(axis=0)]
    assert sorted(id_of_content.tolist()) == list(range(TAU))
    moved = sum(int(np.sum(id_of_content[perm] != np.arange(TAU))) for perm in perms)
    assert report["inter-rematched"] == moved > 0
    for client, perm in enumerate(perms):
        prompts, client_keys = aligned.client_arrays(aligned.slots[str(client)])
        np.testing.assert_allclose(prompts, centres[perm], atol=0.1)
        np.testing.assert_allclose(client_keys, keys[perm], atol=0.1)
        assert len(set(aligned.slots[str(client)].tolist())) == TAU
    # position: slot p is averaged with slot p, mixing different contents; no centre is recovered.
    positional, report = aggregate_inter_pool(pool, updates, mode="position", max_size=20, seed=0)
    assert report["inter-rematched"] == 0
    nearest = np.linalg.norm(positional.prompts.reshape(TAU, 1, -1) - centres.reshape(1, TAU, -1), axis=-1).min(axis=1)
    assert np.all(nearest > 0.3 * typical)
    for slots in positional.slots.values():
        assert slots.tolist() == list(range(TAU))


def test_partial_participation_keeps_unused_clusters_and_decays_their_popularity():
    pool, centres, keys = planted_pool()
    pool, s0 = assign_slots(pool, "a")
    pool, s1 = assign_slots(pool, "absent")  # holds slots but does not take part this round
    usage = np.array([5, 3, 0, 0, 0, 0])  # only clusters 0 and 1 are used by the participant
    update = InterUpdate("a", centres + 0.01, keys, usage)
    new, report = aggregate_inter_pool(pool, [update], mode="align", max_size=20, seed=0)
    assert new.size == TAU and report["inter-clusters-carried"] == TAU - 2 and report["inter-clusters-dropped"] == 0
    by_id = dict(zip(new.ids.tolist(), new.popularity.tolist()))
    for cid in range(2, TAU):
        assert by_id[cid] == pytest.approx(0.5 * UNUSED_DECAY)
        np.testing.assert_array_equal(new.prompts[new.index_of([cid])[0]], pool.prompts[pool.index_of([cid])[0]])
    # the used clusters moved to the participant's prompts; the absent client keeps its slots
    np.testing.assert_allclose(new.prompts[new.index_of([0])[0]], centres[0] + 0.01, atol=1e-5)
    np.testing.assert_array_equal(new.slots["absent"], s1)
    # used clusters are now the most popular: a late joiner starts from them
    new, late = assign_slots(new, "late")
    assert set(late[:2].tolist()) == {0, 1}
    assert sorted(late.tolist()) == list(range(TAU))


def test_the_pool_bound_drops_the_least_popular_and_refills_the_slots_that_held_them():
    pool, centres, keys = planted_pool()
    rng = np.random.default_rng(3)
    updates = []
    for client in range(4):
        pool, _ = assign_slots(pool, str(client))
        prompts = centres + 0.01 * rng.normal(size=centres.shape)
        if client == 0:  # client 0 repurposed slots 0 and 1 for something new: two new clusters
            prompts[:2] = 5.0 * rng.normal(size=(2, LENGTH, DIM))
        updates.append(InterUpdate(str(client), prompts, keys, np.full(TAU, 3)))
    grown, report = aggregate_inter_pool(pool, updates, mode="align", max_size=20, seed=0)
    assert report["inter-clusters-opened"] == 2 and grown.size == TAU + 2
    assert set(grown.slots["0"][:2].tolist()) == {TAU, TAU + 1}  # its slots follow its new content
    bounded, report = aggregate_inter_pool(pool, updates, mode="align", max_size=TAU, seed=0)
    assert bounded.size == TAU and report["inter-clusters-dropped"] == 2
    # client 0's slots that held a dropped cluster got distinct surviving clusters back
    slots = bounded.slots["0"]
    assert len(set(slots.tolist())) == TAU and np.all(bounded.index_of(slots) >= 0)


def test_assign_slots_refills_a_known_client_whose_cluster_was_dropped():
    pool, centres, keys = planted_pool()
    # Cluster 0 is gone and cluster 6 (the least popular) came instead; client "x" still lists 0.
    pool = InterPool(
        ids=np.array([1, 2, 3, 4, 5, 6]),
        prompts=centres,
        keys=keys,
        popularity=np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1]),
        next_id=7,
        slots={"x": np.arange(TAU)},
        tau=TAU,
    )
    pool, slots = assign_slots(pool, "x")
    assert slots.tolist() == [6, 1, 2, 3, 4, 5]  # only the dead slot changes, to a cluster it lacks
    assert pool.slots["x"].tolist() == slots.tolist()


def test_records_round_trip_and_inconsistent_records_are_refused():
    pool, centres, keys = planted_pool()
    pool, updates, _ = permuted_round(pool, centres, keys, num_clients=3)
    pool, _ = aggregate_inter_pool(pool, updates, max_size=20, seed=0)
    again = InterPool.from_record(pool.to_record(), pool.prompts, pool.keys)
    assert again.to_record() == pool.to_record()
    np.testing.assert_array_equal(again.prompts, pool.prompts)
    with pytest.raises(ValueError, match=rf"lists {pool.size} clusters but the arrays hold {pool.size - 1} prompts"):
        InterPool.from_record(pool.to_record(), pool.prompts[:-1], pool.keys)
    record = pool.to_record()
    record["slots"]["0"] = [0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="distinct slots"):
        InterPool.from_record(record, pool.prompts, pool.keys)


def test_bad_calls_are_refused():
    pool, centres, keys = planted_pool()
    with pytest.raises(ValueError, match="no slots"):
        aggregate_inter_pool(pool, [InterUpdate("stranger", centres, keys, np.ones(TAU))])
    pool, _ = assign_slots(pool, "a")
    with pytest.raises(ValueError, match="merge mode"):
        aggregate_inter_pool(pool, [InterUpdate("a", centres, keys, np.ones(TAU))], mode="fedavg")
    with pytest.raises(ValueError, match="shapes"):
        aggregate_inter_pool(pool, [InterUpdate("a", centres[:3], keys, np.ones(TAU))])
    with pytest.raises(ValueError, match="at least tau"):
        aggregate_inter_pool(pool, [InterUpdate("a", centres, keys, np.ones(TAU))], max_size=TAU - 1)


def test_specialisation_diagnostic_reads_the_planted_pattern_structure():
    pool, centres, keys = planted_pool()
    pool, _ = assign_slots(pool, "a")
    pool, _ = assign_slots(pool, "b")
    # Each prompt is retrieved by one pattern only (prompt p by pattern p % 3): fully specialised.
    pure = np.zeros((3, TAU), dtype=np.int64)
    pure[np.arange(TAU) % 3, np.arange(TAU)] = 10
    updates = [InterUpdate(c, centres, keys, pure.sum(0), pure) for c in ("a", "b")]
    _, report = aggregate_inter_pool(pool, updates, max_size=20, seed=0)
    assert report["inter-specialisation-bits"] == pytest.approx(np.log2(3))
    assert report["inter-pattern-entropy-bits"] == pytest.approx(np.log2(3))
    assert report["inter-specialised-share"] == 1.0
    # Every prompt is retrieved by all patterns alike: the pattern tells nothing.
    mixed = np.full((3, TAU), 10, dtype=np.int64)
    updates = [InterUpdate(c, centres, keys, mixed.sum(0), mixed) for c in ("a", "b")]
    _, report = aggregate_inter_pool(pool, updates, max_size=20, seed=0)
    assert report["inter-specialisation-bits"] == pytest.approx(0.0, abs=1e-12)
    assert report["inter-specialised-share"] == 0.0


def test_information_measures():
    assert mutual_information_bits(np.eye(4) * 7) == pytest.approx(2.0)
    assert mutual_information_bits(np.ones((3, 5))) == pytest.approx(0.0)
    assert mutual_information_bits(np.zeros((3, 2))) == 0.0
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    assert specialised_share(np.array([[9, 1, 0], [1, 1, 0], [0, 8, 0]]), 0.8) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mutual_information_bits(-np.ones((2, 2)))


# --- the regimes in which content alignment has work to do (issue 26) --------------------------
def own_pools_round(pool, centres, keys, num_clients: int, seed: int = 1, noise: float = 0.05, mode: str = "align"):
    """Clients that started from pools of their own now hold planted content perm[p] at slot p."""
    return permuted_round(pool, centres, keys, num_clients, seed, noise, own=True, mode=mode)


def nearest_centre_distance(prompts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    flat = prompts.reshape(prompts.shape[0], 1, -1) - centres.reshape(1, centres.shape[0], -1)
    return np.linalg.norm(flat, axis=-1)


def test_own_pools_are_seeded_per_client_at_the_initial_scale():
    pool, centres, keys = planted_pool()
    a = own_pool(pool, "a", seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, own_pool(pool, "a", seed=3)))
    assert not np.allclose(a[0], own_pool(pool, "b", seed=3)[0])
    assert not np.allclose(a[0], own_pool(pool, "a", seed=4)[0])
    rms = np.sqrt(np.mean(np.square(centres)))
    assert np.sqrt(np.mean(np.square(a[0]))) == pytest.approx(rms, rel=0.2)
    assert a[0].shape == centres.shape and a[1].shape == keys.shape


@pytest.mark.parametrize("start", ["warm", "cold"])
def test_independent_pools_align_recovers_the_planted_permutations_and_position_mixes_them(start):
    pool, centres, keys = planted_pool()
    # position: the same clients, the same planted content: slot p is averaged with slot p
    ppool, pupdates, _ = own_pools_round(pool, centres, keys, num_clients=6, mode="position")
    positional, preport = aggregate_inter_pool(ppool, pupdates, mode="position", init="independent", seed=0)
    typical = np.linalg.norm(centres.reshape(TAU, -1), axis=1).mean()
    assert positional.size == TAU  # the clients' own clusters were folded into the shared ones
    assert np.all(nearest_centre_distance(positional.prompts, centres).min(axis=1) > 0.3 * typical)
    assert all(s.tolist() == list(range(TAU)) for s in positional.slots.values())
    # align: every planted content is one cluster again, and each client's slot p holds the
    # centre of the content it had at p.
    apool, aupdates, perms = own_pools_round(pool, centres, keys, num_clients=6)
    aligned, report = aggregate_inter_pool(
        apool, aupdates, mode="align", init="independent", align_start=start, max_size=100, seed=0
    )
    assert aligned.size == TAU, "independent init keeps only the clusters in use"
    distances = nearest_centre_distance(aligned.prompts, centres)
    assert np.all(distances.min(axis=1) < 0.1 * typical)
    for client, perm in enumerate(perms):
        prompts, client_keys = aligned.client_arrays(aligned.slots[str(client)])
        np.testing.assert_allclose(prompts, centres[perm], atol=0.1)
        np.testing.assert_allclose(client_keys, keys[perm], atol=0.1)
    assert report["inter-align-noop"] == 0 and "inter-align-noop" not in preport


@pytest.mark.parametrize("start", ["warm", "cold"])
def test_drift_as_large_as_the_spacing_moves_prompts_under_warm_and_cold_starts(start):
    # Shared pools: every client got the planted centres in slot order; local training carried
    # the content at slot p to another centre's place (drift comparable to the spacing).
    pool, centres, keys = planted_pool()
    pool, updates, perms = permuted_round(pool, centres, keys, num_clients=6)
    aligned, report = aggregate_inter_pool(pool, updates, mode="align", align_start=start, max_size=20, seed=0)
    for client, perm in enumerate(perms):
        prompts, _ = aligned.client_arrays(aligned.slots[str(client)])
        np.testing.assert_allclose(prompts, centres[perm], atol=0.1)
    assert report["inter-rematched"] > 0 and report["inter-align-noop"] == 0
    assert aligned.size == TAU and report["inter-clusters-opened"] == 0  # cold start kept the ids too


@pytest.mark.parametrize("start", ["warm", "cold"])
def test_small_drift_is_reported_as_a_no_op(start):
    pool, centres, keys = planted_pool()
    updates = []
    rng = np.random.default_rng(2)
    for client in range(4):
        pool, _ = assign_slots(pool, str(client))
        updates.append(InterUpdate(str(client), centres + 0.01 * rng.normal(size=centres.shape), keys, np.full(TAU, 4)))
    aligned, report = aggregate_inter_pool(pool, updates, mode="align", align_start=start, max_size=20, seed=0)
    positional, _ = aggregate_inter_pool(pool, updates, mode="position", max_size=20, seed=0)
    assert report["inter-align-noop"] == 1 and report["inter-rematched"] == 0
    for cid in range(TAU):
        np.testing.assert_allclose(
            aligned.prompts[aligned.index_of([cid])[0]], positional.prompts[positional.index_of([cid])[0]], atol=1e-5
        )


def planted_groups_round(pool, num_clients: int, features: str, seed: int = 5):
    """Shared pools; client t's slot p belongs to planted group perm_t[p], seen in its delta or its usage profile."""
    rng = np.random.default_rng(seed)
    sent = pool.prompts.copy()
    directions = rng.normal(size=(TAU, LENGTH, DIM))
    profiles = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.int64) * 20
    updates, perms = [], []
    for client in range(num_clients):
        pool, slots = assign_slots(pool, str(client))
        perm = rng.permutation(TAU)
        perms.append(perm)
        if features == "delta":  # a small change, in the direction of its group
            prompts = sent + 0.2 * directions[perm] + 0.01 * rng.normal(size=sent.shape)
            table = None
        else:  # the prompt barely moved; its group shows in who retrieved it
            prompts = sent + 0.01 * rng.normal(size=sent.shape)
            table = profiles[perm].T.copy()
        usage = table.sum(axis=0) if table is not None else np.full(TAU, 10)
        updates.append(InterUpdate(str(client), prompts, pool.keys.copy(), usage, table))
    return pool, updates, perms


def partition_of(pool, updates) -> set[frozenset[tuple[int, int]]]:
    """The used prompts (client, slot) grouped by the cluster each client's slot now holds."""
    groups: dict[int, set[tuple[int, int]]] = {}
    for update in updates:
        for p, cid in enumerate(pool.slots[update.client].tolist()):
            groups.setdefault(cid, set()).add((int(update.client), p))
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("features", ["delta", "usage"])
def test_align_on_delta_and_usage_group_the_planted_patterns(features):
    pool, _, _ = planted_pool()
    pool, updates, perms = planted_groups_round(pool, 5, features)
    planted = {
        frozenset((c, p) for c, perm in enumerate(perms) for p in range(TAU) if perm[p] == g) for g in range(TAU)
    }
    by_slot = {frozenset((c, p) for c in range(len(perms))) for p in range(TAU)}
    aligned, report = aggregate_inter_pool(pool, updates, mode="align", align_on=features, max_size=100, seed=0)
    assert partition_of(aligned, updates) == planted
    assert report["inter-align-noop"] == 0
    # matching the prompts themselves sees only the (large) shared starting points: grouped by slot
    on_prompts, report = aggregate_inter_pool(pool, updates, mode="align", align_on="prompt", max_size=100, seed=0)
    assert partition_of(on_prompts, updates) == by_slot and report["inter-align-noop"] == 1


def test_align_on_usage_needs_pattern_usage():
    pool, centres, keys = planted_pool()
    pool, _ = assign_slots(pool, "a")
    with pytest.raises(ValueError, match="pattern usage"):
        aggregate_inter_pool(pool, [InterUpdate("a", centres, keys, np.ones(TAU))], align_on="usage")
    with pytest.raises(ValueError, match="align on"):
        aggregate_inter_pool(pool, [InterUpdate("a", centres, keys, np.ones(TAU))], align_on="keys")
    with pytest.raises(ValueError, match="inter init"):
        assign_slots(pool, "b", init="random")


def test_cold_clusters_keep_the_ids_their_members_held():
    # cluster 0 holds the members that held ids 7 and 9 (9 mostly), cluster 1 those of 7, cluster 2 is new
    assignments = [np.array([0, 1]), np.array([0, 1, 2])]
    started = [np.array([9, 7]), np.array([9, 7, 11])]
    weights = [np.array([5.0, 1.0]), np.array([5.0, 1.0, 1.0])]
    names = _name_clusters(assignments, started, weights, num=4)
    assert names.tolist() == [9, 7, 11, -1]
    # names fixed already stay; only candidates are matched, never an id taken
    names = _name_clusters(assignments, started, weights, num=4, names=np.array([11, -1, -1, -1]), candidates={9, 7})
    assert names.tolist() == [11, 7, -1, -1]
    names = _name_clusters(assignments, started, weights, num=4, names=np.full(4, -1), candidates={7, 11})
    assert names.tolist() == [-1, 7, 11, -1]


def test_the_theta_step_budget_reaches_the_alignment():
    """``theta_steps`` (``align-theta-steps``) is the aligner's Adam budget: the objective it reaches moves with it."""
    from fedprime_core.method.aggregation import align_prompts

    pool, centres, keys = planted_pool()
    pool, updates, _ = permuted_round(pool, centres, keys, num_clients=8)
    objectives = {}
    for steps in (1, 50):
        aligned, report = aggregate_inter_pool(pool, updates, mode="align", max_size=20, seed=0, theta_steps=steps)
        assert aligned.size == TAU and report["inter-clusters-opened"] == 0  # the planted contents either way
        objectives[steps] = report["inter-align-objective"]
    assert objectives[50] > objectives[1]  # more steps climb further up the likelihood
    direct = align_prompts(
        [u.prompts.reshape(TAU, -1) for u in updates],
        client_keys=[u.keys for u in updates],
        init_assignments=[pool.index_of(pool.slots[u.client]) for u in updates],
        prompt_weights=[u.usage.astype(float) for u in updates],
        seed=0,
        grad_steps=50,
    )
    assert objectives[50] == pytest.approx(direct.objective, rel=1e-6)
