"""What the lean profile changes in the model: low-rank query maps and a frozen pretrained pooler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprime_core.data.processing import make_loader
from fedprime_core.method.federated import AggregationSettings, ClientUpdate, GlobalState
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import (
    LowRankQuery,
    PromptedModel,
    PromptSettings,
    load_trainable_state,
    query_parameter_count,
    trainable_state,
)
from fedprime_core.method.training import TrainSettings, evaluate, train_local
from tests.generated_data import CLASSES

DIM = 64  # tiny-vilt's width


def build(backbone, method="fedprime", rank=0, train_pooler=True, tau=6, kappa=2, seed=0) -> PromptedModel:
    prompts = PromptSettings(tau=tau, kappa=kappa, query_rank=rank)
    return PromptedModel(backbone, method_spec(method), CLASSES, prompts, seed, train_pooler)


def count(state) -> int:
    return int(sum(v.size for v in state.values()))


@pytest.mark.parametrize("method", ["fedprime", "fed-intra", "pfpt", "fedavg-p"])
@pytest.mark.parametrize("rank", [0, 1, 8])
def test_query_rank_and_exchange_pooler_give_the_documented_parameter_counts(tiny_vilt, method, rank):
    backbone, _ = tiny_vilt
    dense = trainable_state(build(backbone, method))
    lean = trainable_state(build(backbone, method, rank=rank, train_pooler=False))
    spec = method_spec(method)
    keyed = [] if spec.pool_variant == "pfpt" else list(spec.pools)  # PFPT's query projection is its own model
    saved = len(keyed) * (query_parameter_count(DIM, 0) - query_parameter_count(DIM, rank)) + DIM * DIM + DIM
    assert count(dense) - count(lean) == saved
    assert query_parameter_count(DIM, 0) == DIM * DIM + DIM and query_parameter_count(DIM, 8) == 2 * 8 * DIM + DIM
    assert not any(name.startswith("pooler.") for name in lean)
    for pool in spec.pools:
        if pool not in keyed:  # pfpt: the dense, bias-free projection whatever query-rank says
            assert lean[f"pools.{pool}.query.weight"].shape == (DIM, DIM) and f"pools.{pool}.query.bias" not in lean
        elif rank:
            assert lean[f"pools.{pool}.query.down"].shape == (rank, DIM)
            assert lean[f"pools.{pool}.query.up"].shape == (DIM, rank)
            assert lean[f"pools.{pool}.query.bias"].shape == (DIM,)
        else:
            assert lean[f"pools.{pool}.query.weight"].shape == (DIM, DIM)
    # Everything that both models have starts identical: the low-rank factors have their own generator.
    for name in set(dense) & set(lean):
        np.testing.assert_array_equal(dense[name], lean[name], err_msg=name)


def test_a_low_rank_query_map_starts_at_the_identity_and_refuses_a_rank_it_cannot_have():
    query = LowRankQuery(DIM, 4, torch.Generator().manual_seed(0))
    x = torch.randn(5, DIM)
    torch.testing.assert_close(query(x), x)
    for rank in (0, DIM):
        with pytest.raises(ValueError, match="query rank"):
            LowRankQuery(DIM, rank, torch.Generator())


def test_keeping_the_pooler_frozen_needs_a_pretrained_pooler():
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone

    config = ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    backbone = ViltBackbone(ViltModel(config, add_pooling_layer=False))
    with pytest.raises(ValueError, match="has no pretrained pooler.*set exchange-pooler=true"):
        build(backbone, train_pooler=False)
    assert "pooler.weight" in trainable_state(build(backbone, train_pooler=True))


def test_the_lean_model_trains_its_low_rank_queries_and_leaves_the_pooler_pretrained(tiny_vilt, image_only_data):
    backbone, _ = tiny_vilt
    train, test = image_only_data
    model = build(backbone, rank=4, train_pooler=False, tau=8)
    pooler = {k: v.clone() for k, v in model.pooler.state_dict().items()}
    pretrained = backbone.pooler_init()
    start = trainable_state(model)
    result = train_local(
        model, make_loader(train, 32, shuffle=True, seed=0), TrainSettings(epochs=4, lr=0.05, momentum=0.9)
    )
    after = evaluate(model, make_loader(test, 80, shuffle=False))
    print(f"\nlean model, image-only label: accuracy {after['accuracy']:.3f} (chance {1 / CLASSES:.2f})")
    assert after["accuracy"] >= 0.55, after  # as the dense model in test_training.py
    trained = trainable_state(model)
    for pool in ("intra", "inter"):  # the regulariser trains the low-rank update away from the identity
        assert np.abs(trained[f"pools.{pool}.query.up"]).max() > 0
        assert not np.array_equal(trained[f"pools.{pool}.query.down"], start[f"pools.{pool}.query.down"])
    for name, value in model.pooler.state_dict().items():
        torch.testing.assert_close(value, pooler[name])
        torch.testing.assert_close(value, pretrained[name])
    assert result.steps == 48


def test_low_rank_queries_and_no_pooler_aggregate_like_the_dense_model(tiny_vilt, image_only_data):
    """One real round: three clients train from the global state; FedAvg of the factors, alignment of the inter pool."""
    backbone, _ = tiny_vilt
    train, _ = image_only_data
    results = {}
    for rank, train_pooler in ((0, True), (4, False)):
        model = build(backbone, rank=rank, train_pooler=train_pooler, tau=6)
        spec = method_spec("fedprime")
        server = GlobalState(spec, trainable_state(model))
        updates = []
        for client, size in enumerate((96, 128, 160)):
            load_trainable_state(model, server.client_arrays(str(client)))
            subset = torch.utils.data.Subset(train, range(client * 100, client * 100 + size))
            out = train_local(model, make_loader(subset, 32, shuffle=True, seed=client), TrainSettings(lr=0.05))
            updates.append(ClientUpdate(trainable_state(model), out.num_examples, out.usage, str(client)))
        report = server.aggregate(updates, AggregationSettings(max_prompts=20, seed=0))
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        averaged = [n for n in server.arrays if not n.startswith("pools.inter.prompts") and n != "pools.inter.keys"]
        for name in averaged:  # every shared array, query factors included, is the sample-weighted mean
            expected = sum(w * u.state[name] for w, u in zip(weights, updates)) / weights.sum()
            np.testing.assert_allclose(server.arrays[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)
        assert report["intra-pool-size"] == 6 and report["inter-pool-size"] >= 6
        load_trainable_state(model, server.client_arrays("0"))  # the aggregate loads back into the model
        results[rank] = (set(server.arrays), report)
    dense_names, lean_names = results[0][0], results[4][0]
    assert dense_names - lean_names == {
        "pooler.weight",
        "pooler.bias",
        "pools.intra.query.weight",
        "pools.inter.query.weight",
    }
    assert lean_names - dense_names == {f"pools.{p}.query.{f}" for p in ("intra", "inter") for f in ("down", "up")}
