"""PFPT's aggregation (fedprime_core.method.pfpt): the loop oracle, planted answers, the round protocol, the
client pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedprime_core.method.federated import AggregationSettings, ClientUpdate, aggregate_round, validate_update
from fedprime_core.method.methods import method_spec
from fedprime_core.method.pfpt import aggregate_pfpt_pool, pfpt_aggregate, union_of_used
from fedprime_core.metrics import adjusted_rand_index
from tests.pfpt_oracle import loop_pfpt

PFPT_BOUND = float(np.sqrt(6 / (3 * 32 * 32 + 64)))  # PFPT's prompt initialisation at d = 64


def output_rule(theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PFPT's output, as the fast implementation orders it: used centroids, most used first, then by index."""
    counts = np.bincount(z.ravel(), minlength=theta.shape[0])
    used = np.flatnonzero(counts)
    order = used[np.lexsort((used, -counts[used]))]
    index = np.full(theta.shape[0], -1)
    index[order] = np.arange(order.size)
    return theta[order], index[z], counts[order]


def oracle_inputs(kind: str, seed: int) -> np.ndarray:
    """Small local sets (4 clients x 3 prompts x 5 dims) in three regimes."""
    rng = np.random.default_rng(seed)
    n, m, dim = 4, 3, 5
    if kind == "distinct":  # unrelated prompts: every client keeps its own
        return rng.normal(size=(n, m, dim))
    centres = rng.uniform(-0.05, 0.05, (m, dim))
    noise = {"shared": 0.001, "drifted": 0.03}[kind]  # near-copies merge; far-drifted ones may split
    return np.stack([centres[rng.permutation(m)] + noise * rng.normal(size=(m, dim)) for _ in range(n)])


@pytest.mark.parametrize("kind", ["shared", "drifted", "distinct"])
@pytest.mark.parametrize("seed, grad_steps", [(0, 1), (1, 2)])
@pytest.mark.parametrize("schedule", ["per-client", "per-sweep"])
def test_fast_implementation_matches_the_loop_oracle(kind, seed, grad_steps, schedule):
    """Same assignments, centroids, objective and Adam step count as a per-centroid loop of the same equations.

    K = 12 centroids > m^2 = 9, so the fast path's top-m column screening is exercised.
    """
    prompts = oracle_inputs(kind, seed)
    settings = dict(n_sweeps=6, grad_steps=grad_steps, hidden=8, seed=seed, schedule=schedule)
    fast = pfpt_aggregate(prompts, dtype=torch.float64, **settings)
    theta, z, trace, steps = loop_pfpt(prompts, **settings)
    expected_prompts, expected_assignments, expected_usage = output_rule(theta, z)
    np.testing.assert_array_equal(fast.assignments, expected_assignments)
    np.testing.assert_array_equal(fast.usage, expected_usage)
    np.testing.assert_allclose(fast.prompts, expected_prompts, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.objective_trace, trace, rtol=1e-9)
    assert fast.adam_steps == steps


@pytest.fixture()
def adam_steps():
    """Counts every ``optimizer.step()`` taken while the test runs (a global post-step hook)."""
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    yield calls
    handle.remove()


@pytest.mark.parametrize("schedule, expected", [("per-client", 7 * 4), ("per-sweep", 7)])
def test_pfpt_takes_one_adam_step_per_client_per_sweep_by_default(adam_steps, schedule, expected):
    """PFPT's NonparametricAgg steps once per client per sweep (50 n in all); per-sweep once per sweep."""
    prompts = oracle_inputs("drifted", 0)  # 4 clients
    result = pfpt_aggregate(prompts, n_sweeps=7, hidden=8, seed=0, schedule=schedule)
    assert len(adam_steps) == expected and result.adam_steps == expected
    adam_steps.clear()
    pool, report = aggregate_pfpt_pool(
        [p.reshape(3, 1, 5) for p in prompts], [np.ones(3, dtype=np.int64)] * 4, n_sweeps=7, seed=0
    )
    assert len(adam_steps) == report["align-adam-steps"] == 7 * 4  # the round's default is PFPT's count
    with pytest.raises(ValueError, match="schedule"):
        pfpt_aggregate(prompts, n_sweeps=1, schedule="per-round")


def planted(num_clients: int, num_centres: int = 8, dim: int = 64, noise: float = 0.002, seed: int = 0):
    """Every client holds every centre, in its own order, with a small per-client drift (an FL round)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-PFPT_BOUND, PFPT_BOUND, (num_centres, dim))
    truth = np.stack([rng.permutation(num_centres) for _ in range(num_clients)])
    prompts = centres[truth] + noise * rng.normal(size=(num_clients, num_centres, dim))
    return centres, prompts, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_prompts_of_known_clusters_are_recovered(seed):
    centres, prompts, truth = planted(num_clients=10, seed=seed)
    result = pfpt_aggregate(prompts, seed=seed)
    assert result.prompts.shape == centres.shape  # one global prompt per planted cluster
    assert np.all(result.usage == 10)  # each used by every client
    assert adjusted_rand_index(result.assignments.ravel(), truth.ravel()) == 1.0
    for row in result.assignments:  # a client's prompts go to distinct global prompts
        assert len(set(row.tolist())) == len(row)
    assert result.objective_trace[-1] > result.objective_trace[0]


def test_a_client_specific_prompt_becomes_its_own_global_prompt():
    centres, prompts, truth = planted(num_clients=8, seed=4)
    rng = np.random.default_rng(9)
    prompts[3, 2] = rng.uniform(-1, 1, prompts.shape[-1])  # client 3's slot 2 drifted to a new pattern
    result = pfpt_aggregate(prompts, seed=0)
    assert result.prompts.shape[0] == len(centres) + 1
    alone = result.assignments[3, 2]
    assert result.usage[alone] == 1
    assert np.sum(result.assignments == alone) == 1
    others = [a for t, row in enumerate(result.assignments) for j, a in enumerate(row) if (t, j) != (3, 2)]
    assert adjusted_rand_index(np.array(others), np.delete(truth.ravel(), 3 * len(centres) + 2)) == 1.0


def test_unrelated_prompts_are_not_merged():
    """Far-apart prompts (relative to PFPT's scale s <= 1): each client's prompt stays its own."""
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(5, 4, 32)) * 3.0
    result = pfpt_aggregate(prompts, seed=0)
    assert result.prompts.shape[0] == 20 and np.all(result.usage == 1)
    flat = prompts.reshape(20, -1)
    nearest = np.argmin(np.linalg.norm(result.prompts[:, None] - flat[None], axis=-1), axis=1)
    np.testing.assert_array_equal(np.sort(nearest), np.arange(20))


def test_the_bound_keeps_the_most_used_prompts():
    centres, prompts, _ = planted(num_clients=6, seed=2)
    prompts[0, 0] = 5.0  # client 0's slot 0 becomes its own prompt; that slot's cluster has 5 users left
    full = pfpt_aggregate(prompts, seed=0)
    assert full.prompts.shape[0] == len(centres) + 1 and full.num_dropped == 0
    assert list(full.usage) == [6] * (len(centres) - 1) + [5, 1]  # most used first
    bounded = pfpt_aggregate(prompts, seed=0, max_prompts=len(centres))
    assert bounded.num_dropped == 1
    np.testing.assert_array_equal(bounded.usage, full.usage[: len(centres)])
    assert bounded.assignments[0, 0] == -1 and np.sum(bounded.assignments == -1) == 1
    np.testing.assert_allclose(bounded.prompts, full.prompts[: len(centres)])


def test_deterministic_for_a_seed_and_validated():
    _, prompts, _ = planted(num_clients=4, seed=1)
    a, b = pfpt_aggregate(prompts, seed=5), pfpt_aggregate(prompts, seed=5)
    np.testing.assert_array_equal(a.prompts, b.prompts)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    with pytest.raises(ValueError, match="clients, prompts, D"):
        pfpt_aggregate(prompts[0])
    bad = prompts.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pfpt_aggregate(bad)
    with pytest.raises(ValueError, match="max_prompts"):
        pfpt_aggregate(prompts, max_prompts=0)


# ---------------------------------------------------------------------------------------
# One round of PFPT's protocol
# ---------------------------------------------------------------------------------------
def pfpt_round(num_clients: int = 5, tau: int = 8, used_by: dict[int, list[int]] | None = None, seed: int = 0):
    """Clients received one global pool; each trains (moves a little) the rows it used, the rest stay put."""
    rng = np.random.default_rng(seed)
    pool = rng.uniform(-PFPT_BOUND, PFPT_BOUND, (tau, 1, 16)).astype(np.float32)
    used_by = used_by or {t: sorted(rng.choice(5, 2, replace=False).tolist()) for t in range(num_clients)}
    prompts, usage = [], []
    for t in range(num_clients):
        local = pool.copy()
        counts = np.zeros(tau, dtype=np.int64)
        counts[used_by[t]] = rng.integers(1, 20, len(used_by[t]))
        local[used_by[t]] += 0.002 * rng.normal(size=(len(used_by[t]), 1, 16)).astype(np.float32)
        prompts.append(local)
        usage.append(counts)
    return pool, prompts, usage


def test_union_of_used_indices_is_gathered_from_every_client():
    pool, prompts, usage = pfpt_round(used_by={0: [0, 1], 1: [1, 2], 2: [2], 3: [0], 4: [1]})
    np.testing.assert_array_equal(union_of_used(usage), [0, 1, 2])
    new_pool, report = aggregate_pfpt_pool(prompts, usage, max_prompts=50, n_sweeps=50, seed=0)
    assert report["union-size"] == 3 and report["prompts-in"] == 5 * 3
    # Rows nobody used (3..7) are not aggregated; the three used rows come back merged, once each.
    assert new_pool.shape == (3, 1, 16) and report["pool-size"] == 3 and report["largest-cluster"] == 5
    flat_pool = pool.reshape(len(pool), -1)
    nearest = np.argmin(np.linalg.norm(new_pool.reshape(3, 1, -1) - flat_pool[None], axis=-1), axis=1)
    np.testing.assert_array_equal(np.sort(nearest), [0, 1, 2])


def test_aggregate_round_runs_pfpt_and_averages_the_rest():
    pool, prompts, usage = pfpt_round()
    rng = np.random.default_rng(3)
    global_state = {
        "pools.inter.prompts": pool,
        "pools.inter.query.weight": rng.normal(size=(16, 16)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 16)).astype(np.float32),
    }
    updates = []
    for t, (local, counts) in enumerate(zip(prompts, usage)):
        state = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in global_state.items()}
        state["pools.inter.prompts"] = local
        updates.append(ClientUpdate(state=state, num_examples=10 * (t + 1), usage={"inter": counts}))
    expected = {k: v.shape for k, v in global_state.items()}
    assert all(validate_update(u, expected, ["inter"], 100.0) == [] for u in updates)  # no keys: prompts are keys
    outcome = aggregate_round(global_state, updates, method_spec("pfpt"), AggregationSettings(max_prompts=50))
    new, report = outcome.state, outcome.report
    assert outcome.inter_pool is None  # PFPT keeps no per-client pools: every client gets the whole pool
    assert set(new) == set(global_state)
    weights = np.array([u.num_examples for u in updates], dtype=float)
    average = sum(w * u.state["head.weight"] for w, u in zip(weights, updates)) / weights.sum()
    np.testing.assert_allclose(new["head.weight"], average, rtol=1e-5)
    union = union_of_used(usage)
    assert report["inter-union-size"] == union.size
    assert report["inter-pool-size"] == new["pools.inter.prompts"].shape[0]
    assert union.size <= report["inter-pool-size"] <= len(updates) * union.size
    assert report["inter-align-sweeps"] == 5  # AggregationSettings' default sweeps, as passed


# ---------------------------------------------------------------------------------------
# The client model: L2P as PFPT builds it
# ---------------------------------------------------------------------------------------
def test_pfpt_pool_uses_the_prompt_as_key_and_the_frozen_cls_query(tiny_vilt):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor
    from fedprime_core.data.embedded import make_embedded_dataset
    from fedprime_core.data.missing import sample_patterns, setting_mixture
    from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, collate
    from fedprime_core.method.model import PFPTPromptPool, PromptedModel, PromptSettings, trainable_state
    from fedprime_core.method.retrieval import cosine_relevance

    backbone, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)
    samples = make_embedded_dataset(seed=2, num_train=6, num_dev=0, num_test=0).train
    data = MultimodalDataset(
        samples, sample_patterns(6, setting_mixture("none", 0.0), np.random.default_rng(0)), processor, num_classes=8
    )
    batch = collate([data[i] for i in range(6)])
    model = PromptedModel(backbone, method_spec("pfpt"), 8, PromptSettings(tau=7, kappa=2), seed=0).eval()
    pool = model.pools["inter"]
    assert isinstance(pool, PFPTPromptPool)
    names = set(trainable_state(model))
    assert {"pools.inter.prompts", "pools.inter.query.weight"} <= names and "pools.inter.keys" not in names
    assert float(pool.prompts.detach().abs().max()) <= PFPT_BOUND
    with torch.no_grad():
        tokens, mask = backbone.embed(batch)
        cls = backbone.encode(tokens, mask)[:, 0]  # prompt-free forward, [CLS]
        expected = cosine_relevance(cls @ pool.query.weight.t(), pool.prompts[:, 0]).topk(2, dim=1).indices
        out = model(batch)
    assert torch.equal(out.selected["inter"], expected)
    out = model.train()(batch)
    (out.logits.sum() + out.regulariser).backward()
    assert pool.prompts.grad is not None and pool.query.weight.grad is not None
    unused = torch.ones(7, dtype=torch.bool)
    unused[out.selected["inter"].unique()] = False
    assert torch.all(pool.prompts.grad[unused] == 0)  # a prompt nobody selected does not move
    # Gradient clipping groups hold the parameters only (the keys are the prompts, not a leaf)
    for params in model.parameter_groups().values():
        assert all(isinstance(p, torch.nn.Parameter) and p.is_leaf for p in params)


# ---------------------------------------------------------------------------------------
# Through the real ServerApp and ClientApp
# ---------------------------------------------------------------------------------------
def test_pfpt_runs_through_the_apps_with_a_variable_broadcast_pool(quick_config, federation):
    from fedprime_core.results import load_checkpoint

    cfg = quick_config(
        run_name="pfpt", method="pfpt", missing_setting="none", label_alpha=0.5, client_size_sigma=1.0, align_sweeps=10
    )
    federation(cfg)
    folder = federation.run_dir(cfg)
    records = federation.history(cfg)[1:]
    state, _ = load_checkpoint(folder)
    assert "pools.inter.keys" not in state and "pools.inter.query.weight" in state  # the prompt is its own key
    for record in records:
        assert record["accepted"] == 3
        union = record["inter-union-size"]
        assert 1 <= union <= cfg.tau and union <= record["inter-pool-size"] <= 3 * union
        assert record["inter-align-sweeps"] == 10
    assert state["pools.inter.prompts"].shape[0] == records[-1]["inter-pool-size"]
    sizes = [c["num-train"] for c in json.loads((folder / "clients.json").read_text()).values()]
    assert len(set(sizes)) == 3  # label skew with imbalanced sizes (tests/test_data.py checks the split itself)


def test_a_pfpt_run_from_before_pfpt_steps_is_neither_reused_nor_resumed_with_the_new_schedule(quick_config):
    """Runs made before ``pfpt-steps`` existed took PFPT's steps per sweep: their folders say so."""
    from fedprime_core.config import ConfigError, config_to_dict
    from fedprime_core.results import save_checkpoint
    from fedprime_core.tools.experiments.plan import stale_settings
    from server_app.app import prepare_run

    for method, expected in (("pfpt", "per-sweep"), ("fed-intra", "per-client")):
        cfg = quick_config(method=method, run_name=method)
        older = {k: v for k, v in config_to_dict(cfg).items() if k != "pfpt-steps"}  # a config.json from before
        stale = stale_settings(config_to_dict(cfg), older)
        if expected == "per-sweep":
            assert stale == ["'pfpt-steps' ('per-sweep' in the run folder, 'per-client' in the grid)"]
            assert stale_settings(config_to_dict(quick_config(method=method, pfpt_steps="per-sweep")), older) == []
        else:
            assert stale == []  # the key changes nothing for other methods
        folder = Path(cfg.results_dir) / method
        folder.mkdir(parents=True)
        save_checkpoint(folder, {"x": np.zeros(1)}, {"round": 1, "config": older})
        resumed = quick_config(method=method, run_name="again", resume=str(folder))
        if expected == "per-sweep":
            with pytest.raises(ConfigError, match=r"'pfpt-steps' \('per-sweep' -> 'per-client'\)"):
                prepare_run(resumed)
            resumed = quick_config(method=method, run_name="again", resume=str(folder), pfpt_steps="per-sweep")
        assert prepare_run(resumed)[3] == {}  # resumes
