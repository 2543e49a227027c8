"""The ``minimal`` communication profile: a low-rank head and a low-rank update of the frozen pooler.

What it changes in the model (shapes, starting point, what trains), that it trains and
aggregates, that its arrays cross the wire and come back as they left, and that a run's
metrics.json counts exactly the bytes ``benchmarks/communication.py`` reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedprime_core.config import parse_run_config
from fedprime_core.data.processing import make_loader
from fedprime_core.method.federated import AggregationSettings, ClientUpdate, GlobalState, validate_update
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import (
    LowRankLinear,
    LowRankPooler,
    PromptedModel,
    load_trainable_state,
    trainable_state,
)
from fedprime_core.method.training import TrainSettings, evaluate, train_local
from fedprime_core.run_settings import prompted_model
from fedprime_core.wire import UNIT_ROUNDOFF
from fedprime_protocol.messages import instruction_content, parse_train_reply, read_arrays, train_reply_content
from tests.generated_data import CLASSES
from tests.loopback import history, through_flower
from tests.loopback import run_server as run

ROOT = Path(__file__).resolve().parents[1]
DIM = 64  # tiny-vilt's width


def minimal_config(**keys):
    return parse_run_config({"comm-profile": "minimal", "tau": 6, "kappa": 2, **keys})


def build(backbone, method="fedprime", seed=0, **keys) -> PromptedModel:
    return prompted_model(backbone, minimal_config(method=method, **keys), CLASSES, seed=seed)


@pytest.mark.parametrize("method", ["fedprime", "fedavg-p", "pfpt"])
def test_minimal_exchanges_low_rank_factors_and_starts_like_the_dense_model(tiny_vilt, method):
    backbone, _ = tiny_vilt
    lean = prompted_model(
        backbone, parse_run_config({"comm-profile": "lean", "method": method, "tau": 6, "kappa": 2}), CLASSES, seed=0
    )
    model = build(backbone, method)
    dense, minimal = trainable_state(lean), trainable_state(model)
    assert set(dense) - set(minimal) == {"head.0.weight", "pooler.weight"}
    assert set(minimal) - set(dense) == {"head.0.down", "head.0.up", "pooler.down", "pooler.up"}
    shapes = {k: v.shape for k, v in minimal.items() if k.startswith(("head.0", "pooler"))}
    assert shapes == {
        "head.0.down": (16, DIM),
        "head.0.up": (2 * DIM, 16),
        "head.0.bias": (2 * DIM,),
        "pooler.down": (8, DIM),
        "pooler.up": (DIM, 8),
        "pooler.bias": (DIM,),
    }
    saved = (2 * DIM * DIM - 16 * 3 * DIM) + (DIM * DIM - 2 * 8 * DIM)
    assert sum(v.size for v in dense.values()) - sum(v.size for v in minimal.values()) == saved
    # The factors have their own generator: every array both models have starts identical.
    for name in set(dense) & set(minimal):
        np.testing.assert_array_equal(dense[name], minimal[name], err_msg=name)
    # The pooler starts as the pretrained pooler (the update is zero) and that map never travels.
    assert isinstance(model.pooler, LowRankPooler) and isinstance(model.head[0], LowRankLinear)
    x = torch.randn(5, DIM)
    torch.testing.assert_close(model.pooler(x), lean.pooler(x))
    assert "weight" not in dict(model.pooler.named_parameters())
    torch.testing.assert_close(model.pooler.weight, backbone.pooler_init()["weight"])
    # The head's low-rank layer starts at the dense layer's scale.
    product = (model.head[0].up @ model.head[0].down).detach()
    assert 0.5 < float(product.std()) / 0.02 < 2.0


def test_ranks_the_model_cannot_have_are_refused_by_name(tiny_vilt):
    backbone, _ = tiny_vilt
    with pytest.raises(ValueError, match=r"head rank 64 must lie in 1\.\.63"):
        build(backbone, **{"head-rank": DIM})
    with pytest.raises(ValueError, match=r"pooler rank 64 must lie in 1\.\.63"):
        build(backbone, **{"pooler-rank": DIM})
    spec = method_spec("fedprime")
    with pytest.raises(ValueError, match="set pooler-rank=0 or exchange-pooler=true"):
        PromptedModel(backbone, spec, CLASSES, seed=0, train_pooler=False, pooler_rank=4)


def test_a_backbone_without_a_pretrained_pooler_updates_its_seeded_start():
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone

    config = ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    backbone = ViltBackbone(ViltModel(config, add_pooling_layer=False))
    spec = method_spec("fedprime")
    a, b = (PromptedModel(backbone, spec, CLASSES, seed=3, head_rank=4, pooler_rank=4) for _ in range(2))
    torch.testing.assert_close(a.pooler.weight, b.pooler.weight)  # every process builds the same frozen map
    dense = PromptedModel(backbone, spec, CLASSES, seed=3)
    torch.testing.assert_close(a.pooler.weight, dense.pooler.weight)


def test_the_minimal_model_trains_its_factors_and_leaves_the_pretrained_pooler(tiny_vilt, image_only_data):  # noqa: F811
    backbone, _ = tiny_vilt
    train, test = image_only_data
    model = build(backbone, **{"tau": 8})
    frozen = model.pooler.weight.clone()
    start = trainable_state(model)
    result = train_local(
        model, make_loader(train, 32, shuffle=True, seed=0), TrainSettings(epochs=4, lr=0.05, momentum=0.9)
    )
    after = evaluate(model, make_loader(test, 80, shuffle=False))
    print(f"\nminimal model, image-only label: accuracy {after['accuracy']:.3f} (chance {1 / CLASSES:.2f})")
    assert after["accuracy"] >= 0.55, after  # as the dense model in test_training.py
    assert result.steps == 48
    trained = trainable_state(model)
    for name in ("head.0.down", "head.0.up", "pooler.down", "pooler.bias"):
        assert not np.array_equal(trained[name], start[name]), name
    assert np.abs(trained["pooler.up"]).max() > 0  # the update left zero
    torch.testing.assert_close(model.pooler.weight, frozen)
    torch.testing.assert_close(model.pooler.weight, backbone.pooler_init()["weight"])


def test_one_round_of_minimal_clients_averages_every_factor(tiny_vilt, image_only_data):  # noqa: F811
    backbone, _ = tiny_vilt
    train, _ = image_only_data
    model = build(backbone)
    spec = method_spec("fedprime")
    server = GlobalState(spec, trainable_state(model))
    updates = []
    for client, size in enumerate((96, 128, 160)):
        load_trainable_state(model, server.client_arrays(str(client)))
        subset = torch.utils.data.Subset(train, range(client * 100, client * 100 + size))
        out = train_local(model, make_loader(subset, 32, shuffle=True, seed=client), TrainSettings(lr=0.05))
        updates.append(ClientUpdate(trainable_state(model), out.num_examples, out.usage, str(client)))
        assert validate_update(updates[-1], server.expected_shapes(), spec.pools, 1e4) == []
    server.aggregate(updates, AggregationSettings(max_prompts=20, seed=0))
    weights = np.array([u.num_examples for u in updates], dtype=np.float64)
    for name in ("head.0.down", "head.0.up", "head.0.bias", "pooler.down", "pooler.up", "pooler.bias"):
        expected = sum(w * u.state[name] for w, u in zip(weights, updates)) / weights.sum()
        np.testing.assert_allclose(server.arrays[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)
    load_trainable_state(model, server.client_arrays("0"))


@pytest.fixture()
def a_flower_task():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_the_minimal_state_round_trips_on_the_wire(tiny_vilt, a_flower_task):
    """Server -> client -> server through Flower's serialisation: float16 down, a float16 delta up."""
    backbone, _ = tiny_vilt
    cfg = minimal_config()
    spec = method_spec(cfg.method)
    model = prompted_model(backbone, cfg, CLASSES, seed=0)
    sent = trainable_state(model)
    down = through_flower(instruction_content(sent, ConfigRecord({"server-round": 1}), cfg.wire_dtype))
    assert all(a.dtype == "float16" for a in down["arrays"].values())
    received = read_arrays(down)
    assert {k: v.shape for k, v in received.items()} == {k: v.shape for k, v in sent.items()}
    for name, value in sent.items():  # float16 rounding, nothing else
        assert np.all(np.abs(received[name] - value) <= UNIT_ROUNDOFF["float16"] * np.abs(value) + 6e-8), name
    load_trainable_state(model, received)  # what arrives fits the client's minimal model
    rng = np.random.default_rng(0)
    trained = {k: v + (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in received.items()}
    usage = {pool: np.ones(cfg.tau, dtype=np.int64) for pool in spec.pools}
    content = train_reply_content(
        trained, {"num-examples": 50}, usage, {"client-id": "0"}, wire_dtype=cfg.wire_dtype, reference=received
    )
    reply = Message(content=through_flower(content), dst_node_id=0, message_type=MessageType.TRAIN)
    update, _, reasons = parse_train_reply(reply, sent=sent)
    assert reasons == [] and update.wire == "float16 delta"
    assert validate_update(update, GlobalState(spec, sent).expected_shapes(), spec.pools, 1e4) == []
    for name in sent:  # the server rebuilds the client's change on its own float32 copy
        change, rebuilt = trained[name] - received[name], update.state[name] - sent[name]
        assert np.all(np.abs(rebuilt - change) <= UNIT_ROUNDOFF["float16"] * np.abs(change) + 1e-7), name
    # A client of another profile (dense head and pooler) is told what does not fit, never aggregated.
    dense = trainable_state(prompted_model(backbone, replace_profile(cfg, "lean"), CLASSES, seed=0))
    stranger = ClientUpdate(dense, 50, usage, "1")
    reasons = validate_update(stranger, GlobalState(spec, sent).expected_shapes(), spec.pools, 1e4)
    assert any("head.0.weight" in r for r in reasons) and any("head.0.down" in r for r in reasons)


def replace_profile(cfg, profile: str):
    from fedprime_core.config import replace

    return replace(cfg, comm_profile=profile)


def communication_benchmark(monkeypatch):
    """``benchmarks/communication.py`` as a module (it is a script beside ``_common.py``)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("communication_benchmark", ROOT / "benchmarks" / "communication.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["fedprime", "fedavg-p"])
def test_a_minimal_run_sends_and_receives_the_bytes_the_benchmark_counts(quick_config, tiny_vilt, monkeypatch, method):
    cfg = quick_config(
        run_name=f"minimal-{method}",
        method=method,
        comm_profile="minimal",
        num_server_rounds=1,
        fraction_evaluate=0.0,
        server_eval=False,
    )
    grid = run(cfg, num_nodes=3)
    [record] = history(cfg)
    assert record["accepted"] == 3 and record["rejected"] == 0
    expected = communication_benchmark(monkeypatch).profile_bytes(tiny_vilt[0], cfg, num_classes=8)
    assert record["bytes-sent-per-client"] == expected["download-bytes"]
    assert record["bytes-received-per-client"] == expected["upload-array-bytes"]
    assert record["bytes-sent"] == 3 * expected["download-bytes"]
    trains = [m.content["arrays"] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 3
    for arrays in trains:
        assert {"head.0.down", "pooler.down"} <= set(arrays) and not {"head.0.weight", "pooler.weight"} & set(arrays)
        assert all(a.dtype == "float16" for a in arrays.values())
