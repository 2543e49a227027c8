"""Reply validation and round aggregation on plain arrays (framework-free)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprime_core.method.federated import (
    AggregationSettings,
    ClientUpdate,
    aggregate_round,
    client_identity,
    validate_update,
)
from fedprime_core.method.interpool import InterPool, assign_slots
from fedprime_core.method.methods import method_spec

EXPECTED = {"pools.inter.prompts": (4, 1, 3), "pools.inter.keys": (4, 3), "head.weight": (2, 3)}


def good_update(rng=None, **changes) -> ClientUpdate:
    rng = rng or np.random.default_rng(0)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in EXPECTED.items()}
    base = dict(state=state, num_examples=10, usage={"inter": np.array([3, 0, 2, 1])})
    base.update(changes)
    return ClientUpdate(**base)


def reasons(update) -> list[str]:
    return validate_update(update, EXPECTED, ["inter"], max_norm=100.0)


def test_a_good_update_passes():
    assert reasons(good_update()) == []


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda u: u.state.pop("head.weight"), "missing arrays: head.weight"),
        (lambda u: u.state.__setitem__("extra", np.zeros(1, np.float32)), "unexpected arrays: extra"),
        (lambda u: u.state.__setitem__("head.weight", np.zeros((2, 4), np.float32)), "shape (2, 4), expected (2, 3)"),
        (lambda u: u.state.__setitem__("head.weight", np.zeros((2, 3), np.int32)), "dtype int32"),
        (lambda u: u.state["head.weight"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda u: u.state["head.weight"].__setitem__((0, 0), np.inf), "NaN or Inf"),
        (lambda u: u.state.__setitem__("head.weight", np.full((2, 3), 1e3, np.float32)), "L2 norm"),
        (lambda u: u.state.__setitem__("head.weight", [[0.0] * 3] * 2), "not an ndarray"),
        (lambda u: u.usage.__setitem__("inter", np.array([1, 2, 3])), "pool holds 4 prompts"),
        (lambda u: u.usage.__setitem__("inter", np.array([1, -1, 0, 0])), "non-negative"),
        (lambda u: u.usage.__setitem__("inter", np.zeros(4)), "at least one use"),
        (lambda u: u.usage.__setitem__("inter", np.array([0.5, 1, 0, 0])), "integers"),
        (lambda u: u.usage.pop("inter"), "usage counts for pool 'inter' are missing"),
        (lambda u: setattr(u, "num_examples", 0), "num-examples must be a positive integer"),
        (lambda u: setattr(u, "num_examples", 2.5), "num-examples must be a positive integer"),
        (lambda u: setattr(u, "num_examples", True), "num-examples must be a positive integer"),
    ],
)
def test_each_bad_reply_is_rejected_with_its_reason(mutate, fragment):
    update = good_update()
    mutate(update)
    found = reasons(update)
    assert any(fragment in r for r in found), found


def test_usage_counts_are_bounded_by_the_samples_that_could_make_them():
    """10 samples, 2 epochs, kappa 3: at most (10 + 1) x 6 = 66 uses of a pool (60 when every pass is counted);
    the counts weigh the merged inter centres, so more would outweigh the samples trained. Real local training
    counts exactly samples x epochs x kappa (tests/test_training.py), so an honest reply is never refused."""

    def check(counts, num=10):
        update = good_update(num_examples=num, usage={"inter": np.array(counts)})
        return validate_update(update, EXPECTED, ["inter"], max_norm=100.0, max_uses_per_example=2 * 3)

    assert check([30, 30, 0, 0]) == [] and check([66, 0, 0, 0]) == []
    assert check([60.0, 6.0, 0.0, 0.0]) == []  # integer-valued floats count the same
    [reason] = check([10**12, 0, 0, 0])
    assert reason == (
        "usage counts for pool 'inter' add up to 1000000000000, more than 10 samples can make "
        "(at most 66: (num-examples + 1) x local-epochs x kappa)"
    )
    assert check([67, 0, 0, 0]) != [] and check([67, 0, 0, 0], num=11) == []
    assert validate_update(good_update(usage={"inter": np.array([10**12, 0, 0, 0])}), EXPECTED, ["inter"], 100.0) == []
    assert check([5, 0, 0, 0], num=0) == ["num-examples must be a positive integer, got 0"]  # one reason, not two


def test_norm_and_finiteness_are_exact_where_the_squares_overflow_the_dtype():
    """float16 squares of 300 overflow (max 65504): the values are finite and the norm is in bounds."""
    update = good_update()
    update.state["head.weight"] = np.full((2, 3), 30.0, np.float16)  # norm 73.5 < 100, squares 900: no overflow
    assert reasons(update) == []
    update.state["head.weight"] = np.array([[300.0, 0, 0], [0, 0, 0]], np.float16)  # 300^2 overflows float16
    assert any("L2 norm 300" in r for r in reasons(update)), reasons(update)
    update.state["head.weight"] = np.array([[90.0, 0, 0], [0, 0, 0]], np.float16)
    update.state["pools.inter.keys"] = np.full((4, 3), 1e19, np.float32)  # squares overflow float32
    found = reasons(update)
    assert found == [f"array 'pools.inter.keys' has L2 norm {np.sqrt(12) * 1e19:.3g} above the bound 100"], found
    update.state["pools.inter.keys"][1, 2] = -np.inf
    assert any("'pools.inter.keys' contains NaN or Inf" in r for r in reasons(update))


def test_non_updates_are_rejected_not_raised():
    assert "not a ClientUpdate" in reasons({"state": {}})[0]
    assert reasons(ClientUpdate(state=None, num_examples=1, usage={}))  # type: ignore[arg-type]


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    elements=None,
)
junk = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    arrays,
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.one_of(
        junk, st.dictionaries(st.sampled_from([*EXPECTED, "other", ""]), st.one_of(arrays, junk), max_size=5)
    ),
    usage=st.one_of(
        junk, st.dictionaries(st.sampled_from(["inter", "intra", "x"]), st.one_of(arrays, junk), max_size=3)
    ),
    num_examples=junk,
)
def test_validator_never_crashes_on_malformed_records(state, usage, num_examples):
    update = ClientUpdate(state=state, num_examples=num_examples, usage=usage)  # type: ignore[arg-type]
    out = validate_update(update, EXPECTED, ["inter"], max_norm=10.0)
    assert isinstance(out, list) and all(isinstance(r, str) for r in out)
    if not isinstance(state, dict) or set(state) != set(EXPECTED):
        assert out  # anything without exactly the expected arrays is rejected


def round_inputs(num_clients: int, seed: int = 0):
    """Clients received one global pool of 5 prompts; they use different subsets of it."""
    rng = np.random.default_rng(seed)
    global_state = {
        "pools.inter.prompts": rng.normal(size=(5, 2, 4)).astype(np.float32),
        "pools.inter.keys": rng.normal(size=(5, 4)).astype(np.float32),
        "pools.intra.prompts": rng.normal(size=(3, 2, 4)).astype(np.float32),
        "pools.intra.keys": rng.normal(size=(3, 4)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }
    updates = []
    for client in range(num_clients):
        state = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in global_state.items()}
        inter_usage = np.zeros(5, dtype=np.int64)
        inter_usage[rng.permutation(5)[:3]] = rng.integers(1, 9, size=3)
        updates.append(
            ClientUpdate(
                state=state, num_examples=10 * (client + 1), usage={"inter": inter_usage, "intra": np.ones(3, np.int64)}
            )
        )
    return global_state, updates


def personal_round(num_clients: int, seed: int = 0):
    """The same round as personalised FedPrime sees it: every client holds slots of one inter pool."""
    global_state, updates = round_inputs(num_clients, seed)
    pool = InterPool.initial(global_state["pools.inter.prompts"], global_state["pools.inter.keys"])
    for client, update in enumerate(updates):
        pool, slots = assign_slots(pool, str(client))
        assert slots.tolist() == [0, 1, 2, 3, 4]  # a new client gets the most popular centres
        update.client_id = str(client)
    return global_state, updates, pool


def test_aggregate_round_aligns_inter_and_averages_the_rest():
    global_state, updates, pool = personal_round(4)
    outcome = aggregate_round(
        global_state, updates, method_spec("fedprime"), AggregationSettings(max_prompts=50, seed=0), inter_pool=pool
    )
    new, report = outcome.state, outcome.report
    weights = np.array([u.num_examples for u in updates], dtype=float)
    expected_head = sum(w * u.state["head.weight"] for w, u in zip(weights, updates)) / weights.sum()
    np.testing.assert_allclose(new["head.weight"], expected_head, rtol=1e-5)
    used = sorted({int(i) for u in updates for i in np.flatnonzero(u.usage["inter"])})
    # Clusters nobody used are carried over, so the global pool keeps all 5 centres.
    assert new["pools.inter.prompts"].shape == (5, 2, 4) and new["pools.inter.keys"].shape == (5, 4)
    assert report["inter-pool-size"] == 5 and report["intra-pool-size"] == 3
    assert report["inter-clusters-carried"] == 5 - len(used) and report["inter-rematched"] == 0
    # each merged prompt stays next to the global prompt its members started from
    for prompt in new["pools.inter.prompts"]:
        distances = np.linalg.norm((global_state["pools.inter.prompts"] - prompt).reshape(5, -1), axis=1)
        assert distances.min() < 0.05
    # every client keeps its 5 slots; each slot holds the centre of the cluster it started in
    assert sorted(outcome.inter_pool.slots) == ["0", "1", "2", "3"]
    for slots in outcome.inter_pool.slots.values():
        assert slots.tolist() == [0, 1, 2, 3, 4]


def test_aggregate_round_respects_the_pool_bound_and_methods():
    global_state, updates, pool = personal_round(4)
    settings = AggregationSettings(max_prompts=5, seed=0, inter_merge="position")
    outcome = aggregate_round(global_state, updates, method_spec("fed-inter"), settings, inter_pool=pool)
    assert outcome.state["pools.inter.prompts"].shape[0] == 5
    with pytest.raises(ValueError, match="personal inter pools"):
        aggregate_round(global_state, updates, method_spec("fedprime"))
    pfpt = aggregate_round(
        global_state, updates, method_spec("pfpt"), AggregationSettings(max_prompts=50, sweeps=10, seed=0)
    )
    assert pfpt.report["inter-pool-size"] == pfpt.state["pools.inter.prompts"].shape[0]  # tests/test_pfpt.py: more
    assert pfpt.inter_pool is None
    intra_only = {k: v for k, v in global_state.items() if not k.startswith("pools.inter")}
    plain = [
        ClientUpdate(
            state={k: u.state[k] for k in intra_only}, num_examples=u.num_examples, usage={"intra": u.usage["intra"]}
        )
        for u in updates
    ]
    new = aggregate_round(intra_only, plain, method_spec("fed-intra")).state
    assert new["pools.intra.prompts"].shape == (3, 2, 4)
    central = aggregate_round(global_state, updates[:1], method_spec("centralized-p")).state
    assert all(np.array_equal(central[k], updates[0].state[k]) for k in central)
    with pytest.raises(ValueError):
        aggregate_round(global_state, [], method_spec("fedprime"))


def test_pattern_usage_must_add_up_to_the_usage_counts():
    good = good_update(pattern_usage={"inter": np.array([[1, 0, 2, 0], [2, 0, 0, 1], [0, 0, 0, 0]])})
    assert reasons(good) == []
    wrong_sum = good_update(pattern_usage={"inter": np.array([[1, 0, 2, 0], [2, 0, 0, 0], [0, 0, 0, 0]])})
    assert any("does not add up" in r for r in reasons(wrong_sum))
    wrong_shape = good_update(pattern_usage={"inter": np.zeros((2, 4), np.int64)})
    assert any("pattern usage for pool 'inter' has shape (2, 4)" in r for r in reasons(wrong_shape))


def test_client_identity_prefers_an_explicit_id_then_the_partition():
    assert client_identity({"client-id": "hospital-a", "partition-id": 3}, 77) == "hospital-a"
    assert client_identity({"partition-id": 3, "num-partitions": 4}, 77) == "3"
    assert client_identity({}, 77) == "node-77"
