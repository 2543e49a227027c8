"""Personalised inter pools: planted answers for content alignment, slots, popularity, resume records."""

from __future__ import annotations

import numpy as np
import pytest

from fedprime_core.method.interpool import (
    UNUSED_DECAY,
    InterPool,
    InterUpdate,
    aggregate_inter_pool,
    assign_slots,
)
from fedprime_core.metrics import entropy_bits, mutual_information_bits, specialised_share

TAU, LENGTH, DIM = 6, 1, 32


def planted_pool(seed: int = 0) -> tuple[InterPool, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TAU, LENGTH, DIM))
    keys = rng.normal(size=(TAU, DIM))
    return InterPool.initial(centres, keys), centres, keys


def permuted_round(pool, centres, keys, num_clients: int, seed: int = 1, noise: float = 0.05):
    """Every client was given the pool in slot order 0..tau-1, but its slot p now holds planted content perm[p]."""
    rng = np.random.default_rng(seed)
    updates, perms = [], []
    for client in range(num_clients):
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
