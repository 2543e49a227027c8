"""The prompted model: retrieval, batch independence, exported state, every method variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprime_core.data.embedded import make_embedded_dataset
from fedprime_core.data.missing import sample_patterns, setting_mixture
from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, collate
from fedprime_core.method.methods import METHOD_SPECS, method_spec
from fedprime_core.method.model import (
    PromptedModel,
    PromptSettings,
    load_trainable_state,
    state_nbytes,
    trainable_state,
)
from fedprime_core.method.retrieval import cosine_relevance, retrieval_regulariser, select_prompts


@pytest.fixture(scope="module")
def batch(tiny_vilt):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor

    _, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)
    samples = make_embedded_dataset(seed=1, num_train=12, num_dev=0, num_test=0).train
    patterns = sample_patterns(12, setting_mixture("miss-both", 0.5), np.random.default_rng(0))
    data = MultimodalDataset(samples, patterns, processor, num_classes=8)
    return collate([data[i] for i in range(12)])


def sub(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def test_per_sample_selection_differs_from_batch_majority():
    relevance = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.8, 0.9], [0.0, 0.2, 0.7, 0.9]])
    per_sample = select_prompts(relevance, 2, "sample")
    assert per_sample[0].tolist() == [0, 1] and per_sample[1].tolist() == [3, 2]
    majority = select_prompts(relevance, 2, "batch")
    assert all(sorted(row.tolist()) == [2, 3] for row in majority)  # sample 0 is overruled by the batch


def test_regulariser_pulls_selected_keys_towards_queries():
    keys = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    query = torch.tensor([[1.0, 1.0]])
    relevance = cosine_relevance(query, keys)
    loss = retrieval_regulariser(relevance, torch.tensor([[0]]))
    loss.backward()
    step = keys.detach() - 0.1 * keys.grad
    assert float(cosine_relevance(query, step)[0, 0]) > float(relevance.detach()[0, 0])  # descent moves key 0 to q
    assert torch.all(keys.grad[1] == 0)  # unselected keys are untouched


@pytest.mark.parametrize("method", ["fedprime", "fed-inter", "pfpt"])
def test_prediction_does_not_depend_on_the_rest_of_the_batch(tiny_vilt, batch, method):
    backbone, _ = tiny_vilt
    model = PromptedModel(backbone, method_spec(method), 8, PromptSettings(tau=10, kappa=3), seed=0).eval()
    with torch.no_grad():
        full = model(batch)
        for i in range(len(batch["labels"])):
            alone = model(sub(batch, [i]))
            assert torch.equal(alone.selected[model.spec.pools[0]][0], full.selected[model.spec.pools[0]][i])
            torch.testing.assert_close(alone.logits[0], full.logits[i], atol=1e-4, rtol=1e-4)
            assert int(alone.logits.argmax()) == int(full.logits[i].argmax())


def test_batch_selection_reproduces_the_reference_batch_dependence(tiny_vilt, batch):
    backbone, _ = tiny_vilt
    model = PromptedModel(
        backbone, method_spec("fed-inter"), 8, PromptSettings(tau=10, kappa=2, selection="batch"), seed=0
    )
    model.eval()
    with torch.no_grad():
        full = model(batch).selected["inter"]
        alone = [model(sub(batch, [i])).selected["inter"][0] for i in range(len(batch["labels"]))]
    assert all(torch.equal(full[0], row) for row in full)  # one choice for the whole batch
    assert any(not torch.equal(a.sort().values, full[i].sort().values) for i, a in enumerate(alone))


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_every_method_runs_and_exports_only_trainable_parts(tiny_vilt, batch, method):
    backbone, _ = tiny_vilt
    model = PromptedModel(backbone, method_spec(method), 8, PromptSettings(tau=6, kappa=2, map_length=4), seed=0)
    out = model(batch)
    assert out.logits.shape == (12, 8)
    out.logits.sum().backward()
    state = trainable_state(model)
    backbone_names = {f"backbone.{n}" for n in backbone.state_dict()}
    assert not backbone_names & set(state)
    assert all(not name.startswith("backbone.") for name in state)
    assert all(p.grad is None for p in backbone.parameters())
    backbone_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    assert state_nbytes(state) < backbone_bytes


def test_exported_size_for_vilt_b32_is_a_small_fraction(tiny_vilt):
    """Report: exchanged bytes vs the ViLT-B/32 backbone (random weights, no download)."""
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone

    backbone = ViltBackbone(ViltModel(ViltConfig()))
    model = PromptedModel(backbone, method_spec("fedprime"), 8, PromptSettings(), seed=0)
    exchanged = state_nbytes(trainable_state(model))
    frozen = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    print(f"\nfedprime exchanges {exchanged / 1e6:.2f} MB per client per round; ViLT-B/32 is {frozen / 1e6:.1f} MB")
    assert exchanged < 0.05 * frozen


def test_state_round_trip_and_pool_resize(tiny_vilt):
    backbone, _ = tiny_vilt
    a = PromptedModel(backbone, method_spec("fedprime"), 8, PromptSettings(tau=6, kappa=2), seed=0)
    b = PromptedModel(backbone, method_spec("fedprime"), 8, PromptSettings(tau=6, kappa=2), seed=1)
    state = trainable_state(a)
    state["pools.inter.prompts"] = np.random.default_rng(0).normal(size=(9, 1, 64)).astype(np.float32)
    state["pools.inter.keys"] = np.random.default_rng(1).normal(size=(9, 64)).astype(np.float32)
    load_trainable_state(b, state)
    assert b.pools["inter"].size == 9
    for name, value in trainable_state(b).items():
        np.testing.assert_array_equal(value, state[name])
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(b, {**state, "head.0.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(b, {k: v for k, v in state.items() if k != "pooler.weight"})


def test_initialisation_is_deterministic(tiny_vilt):
    backbone, _ = tiny_vilt

    def make(seed: int) -> dict:
        return trainable_state(PromptedModel(backbone, method_spec("fedprime"), 8, PromptSettings(), seed=seed))

    first, again, other = make(3), make(3), make(4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["pools.inter.prompts"], other["pools.inter.prompts"])


def test_missing_aware_prompts_follow_the_sample_pattern(tiny_vilt, batch):
    backbone, _ = tiny_vilt
    model = PromptedModel(backbone, method_spec("fedavg-p"), 8, PromptSettings(map_length=4, map_depth=6), seed=0)
    assert model.map_prompts.prompts.shape == (3, 2, 4, 64)  # depth clipped to the 2 blocks of tiny-vilt
    out = model(batch)
    out.logits.sum().backward()
    grads = model.map_prompts.prompts.grad.abs().sum(dim=(1, 2, 3))
    present = set(batch["missing_type"].tolist())
    for pattern in range(3):
        assert (grads[pattern] > 0) == (pattern in present)


def test_reference_missing_aware_init_is_zeros_with_one_token_per_pattern_and_nothing_else_moves(tiny_vilt):
    """map-prompt-init=reference (comparison only): the reference code's prompts, every other part as with
    the default init of the same seed, so a paired run differs in the prompts' start alone."""
    backbone, _ = tiny_vilt

    def make(init: str) -> dict:
        settings = PromptSettings(map_length=4, map_depth=2, map_init=init)
        return trainable_state(PromptedModel(backbone, method_spec("fedavg-p"), 8, settings, seed=5))

    normal, reference = make("normal"), make("reference")
    prompts = reference["map_prompts.prompts"]  # (pattern, block, token, d)
    expected = np.zeros_like(prompts)
    expected[0, :, 0] = expected[1, :, 2] = expected[2, :, 1] = 1.0  # complete, text missing, image missing
    assert np.array_equal(prompts, expected)
    assert 0.01 < normal["map_prompts.prompts"].std() < 0.03  # N(0, 0.02)
    assert set(normal) == set(reference)
    assert all(np.array_equal(normal[k], reference[k]) for k in normal if k != "map_prompts.prompts")
    with pytest.raises(ValueError, match="'normal' or 'reference'"):
        make("zeros")


@pytest.mark.parametrize("method, pools", [("fedprime", 2), ("fed-inter", 1)])
def test_first_prompt_readout_classifies_from_the_first_retrieved_prompt(tiny_vilt, batch, method, pools):
    """readout=first-prompt (comparison only, D5): the pooler reads the final state of sequence position 0,
    the first pool's most relevant prompt, instead of [CLS] after the pools' kappa prompts each."""
    backbone, _ = tiny_vilt
    settings = PromptSettings(tau=6, kappa=2)
    seen: dict[str, torch.Tensor] = {}
    encode = backbone.encode

    def recording(*args, **kwargs):
        seen["hidden"] = encode(*args, **kwargs)
        return seen["hidden"]

    def pooler_input(model: PromptedModel) -> tuple[torch.Tensor, torch.Tensor]:
        handle = model.pooler.register_forward_hook(lambda module, inputs, output: seen.update(read=inputs[0]))
        backbone.encode = recording
        try:
            with torch.no_grad():
                logits = model(batch).logits
        finally:
            backbone.encode = encode
            handle.remove()
        return seen["read"], logits

    cls_model = PromptedModel(backbone, method_spec(method), 8, settings, seed=0)
    first_model = PromptedModel(backbone, method_spec(method), 8, settings, seed=0, readout="first-prompt")
    read, cls_logits = pooler_input(cls_model)
    assert torch.equal(read, seen["hidden"][:, pools * settings.kappa])  # [CLS] follows the retrieved prompts
    read, first_logits = pooler_input(first_model)
    assert torch.equal(read, seen["hidden"][:, 0])
    assert not torch.allclose(cls_logits, first_logits)
    assert set(trainable_state(cls_model)) == set(trainable_state(first_model))  # the same parts travel
    with pytest.raises(ValueError, match="has no pool"):
        PromptedModel(backbone, method_spec("fedavg-p"), 8, settings, readout="first-prompt")


def test_pretrained_source_is_a_checked_directory_or_a_hub_id(tmp_path):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.base import resolve_pretrained_source

    def resolve_vilt_source(model: str) -> str:
        return resolve_source("vilt", model)

    def resolve_text_encoder_source(model: str) -> str:
        return resolve_source("text-encoder", model)

    for resolve in (resolve_pretrained_source, resolve_vilt_source, resolve_text_encoder_source):
        assert resolve("dandelin/vilt-b32-mlm") == "dandelin/vilt-b32-mlm"
        with pytest.raises(FileNotFoundError, match="has no config.json"):
            resolve(str(tmp_path))
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_vilt_source(str(tmp_path)) == str(tmp_path)


def test_a_random_pooler_start_ignores_the_pretrained_pooler_and_changes_nothing_else(tiny_vilt):
    """pooler-init=random (comparison only, D4): the reference's models start the pooler at random."""
    backbone, _ = tiny_vilt
    pretrained = backbone.pooler_init()
    assert pretrained is not None  # the generated ViLT carries a pooler, as the real one does
    settings = PromptSettings(tau=6, kappa=2)
    ours = trainable_state(PromptedModel(backbone, method_spec("fedprime"), 8, settings, seed=3))
    rand = trainable_state(PromptedModel(backbone, method_spec("fedprime"), 8, settings, seed=3, pooler_init="random"))
    assert np.array_equal(ours["pooler.weight"], pretrained["weight"].numpy())
    assert not np.allclose(rand["pooler.weight"], ours["pooler.weight"])
    assert 0.015 < rand["pooler.weight"].std() < 0.025 and not rand["pooler.bias"].any()  # N(0, 0.02), zero bias
    assert set(ours) == set(rand)
    assert all(np.array_equal(ours[k], rand[k]) for k in ours if not k.startswith("pooler."))  # the same draws
    with pytest.raises(ValueError, match="'pretrained', 'random'"):
        PromptedModel(backbone, method_spec("fedprime"), 8, settings, pooler_init="zeros")
    with pytest.raises(ValueError, match="frozen"):
        PromptedModel(backbone, method_spec("fedprime"), 8, settings, train_pooler=False, pooler_init="random")
