"""The tiny backbones ship as weights: equal to what their generators make, loaded without generating."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from fedprime_core.backbones.shipped import ShippedWeightsError, read_shipped, shipped_path, tensor_digest
from fedprime_core.backbones.tiny import TINY_VILT, TINY_VILT_VERSION, ensure_tiny_vilt
from fedprime_core.backbones.tiny_bert import TINY_BERT, TINY_BERT_VERSION, ensure_tiny_bert
from fedprime_core.tools import shipped_weights
from fedprime_core.tools.launch import APP_DIR, stage_app

MODELS = [(TINY_VILT, TINY_VILT_VERSION), (TINY_BERT, TINY_BERT_VERSION)]


@pytest.mark.parametrize(("name", "version"), MODELS)
def test_shipped_files_carry_their_checksum_and_provenance(name, version):
    state, header = read_shipped(shipped_path(name, version))
    assert header["model"] == name and header["version"] == version
    assert header["sha256"] == tensor_digest(state)
    made = header["made-with"]
    assert made["generator"].startswith("fedprime_core.backbones.") and made["threads"] == 1
    assert all(t.dtype == torch.float32 for t in state.values())


def test_loading_unpacks_the_shipped_weights_and_never_generates(tmp_path, monkeypatch):
    from fedprime_core.backbones import resolve_source, tiny, tiny_bert
    from fedprime_core.backbones.text_encoder import load_text_encoder
    from fedprime_core.backbones.vilt import load_vilt

    def no_generation(*args, **kwargs):
        raise AssertionError("a shipped model must not be generated")

    monkeypatch.setenv("FEDPRIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "_pretrain", no_generation)
    monkeypatch.setattr(tiny_bert, "_pretrain_tiny_bert", no_generation)
    backbone, _ = load_vilt(resolve_source("vilt", "tiny-vilt"))
    vilt_state, vilt_header = read_shipped(shipped_path(TINY_VILT, TINY_VILT_VERSION))
    assert tensor_digest(backbone.vilt.state_dict()) == vilt_header["sha256"]
    folder = ensure_tiny_vilt()
    assert folder.parent == tmp_path / "cache" and folder.name == f"tiny-vilt-v6-{vilt_header['sha256'][:12]}"
    encoder, _ = load_text_encoder(str(ensure_tiny_bert()), feature_dim=8)
    _, bert_header = read_shipped(shipped_path(TINY_BERT, TINY_BERT_VERSION))
    assert tensor_digest(encoder.encoder.state_dict()) == bert_header["sha256"]


def test_a_damaged_file_is_refused_with_the_way_out(tmp_path):
    record = json.loads(shipped_path(TINY_BERT, TINY_BERT_VERSION).read_text())
    name = sorted(record["tensors"])[0]
    data = bytearray(record["tensors"][name]["data"].encode())
    data[:4] = b"AAAA" if data[:4] != b"AAAA" else b"BBBB"
    record["tensors"][name]["data"] = data.decode()
    damaged = tmp_path / "tiny-bert-v1.json"
    damaged.write_text(json.dumps(record))
    with pytest.raises(
        ShippedWeightsError, match="fails its checksum.*python -m fedprime_core.tools.shipped_weights write"
    ):
        read_shipped(damaged)
    damaged.write_text("{}")
    with pytest.raises(ShippedWeightsError, match="not a shipped weight file"):
        read_shipped(damaged)


def _fab_files(app_dir) -> list[str]:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app_dir)
    assert len(fab) < 10 * 1024 * 1024
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


@pytest.mark.parametrize("staged", [False, True], ids=["checkout", "staged-app"])
def test_the_app_bundle_carries_the_apps_and_the_weights_and_nothing_else(tmp_path, staged):
    names = _fab_files(stage_app(tmp_path / "app") if staged else APP_DIR)
    assert "fedprime_core/backbones/shipped/tiny-vilt-v6.json" in names
    assert "fedprime_core/backbones/shipped/tiny-bert-v1.json" in names
    apps = {"client_app/app.py", "server_app/app.py", "fedprime_protocol/messages.py", "fedprime_protocol/logs.py"}
    assert apps | {"fedprime_core/runtime.py"} <= set(names)
    tops = {n.split("/")[0] for n in names}
    packages = {"fedprime_core", "fedprime_protocol", "server_app", "client_app"}
    assert tops == packages | {"pyproject.toml", "README.md", ".info"}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "version"), MODELS)
def test_regenerating_gives_the_shipped_weights(name, version):
    """The generator is the source of truth: run it (about a minute) and compare with the shipped file."""
    generate = shipped_weights.tiny_models()[name][1]
    generated, made_with = generate()
    stored, header = read_shipped(shipped_path(name, version))
    result = shipped_weights.compare(stored, generated)
    ok, verdict = shipped_weights.judge(result, made_with, header["made-with"])
    assert ok, (verdict, result)
    if not shipped_weights.software_differences(made_with, header["made-with"]):
        assert result["identical"], result  # the same software and CPU architecture: bit for bit


def test_the_verdict_asks_bits_only_of_the_same_software():
    made = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "numpy": "2.4.6", "machine": "x86_64", "seed": 1}
    newer = {**made, "transformers": "5.25.0"}
    near = {"same-names": True, "identical": False, "max-abs-diff": 0.003}
    far = {"same-names": True, "identical": False, "max-abs-diff": 0.5}
    assert shipped_weights.judge({**near, "identical": True, "max-abs-diff": 0.0}, made, made)[0]
    assert not shipped_weights.judge(near, made, made)[0]  # same software: the last bits must agree too
    ok, verdict = shipped_weights.judge(near, newer, made)
    assert ok and "transformers 5.24.0 -> 5.25.0" in verdict
    assert not shipped_weights.judge(far, newer, made)[0]
    assert not shipped_weights.judge({"same-names": False, "identical": False, "max-abs-diff": None}, made, made)[0]
