"""The tiny backbones ship as weights: equal to what their generators make, loaded without generating."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from fedprime_core.backbones.generated import made_with
from fedprime_core.backbones.shipped import ShippedWeightsError, read_header, read_shipped, shipped_path, tensor_digest
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
    """The generator is the source of truth: run it (about a minute) and compare with the shipped file.

    On the shipped file's instruction set (held there by environment variables on a wider
    CPU) and software, bit for bit; with other software or on another architecture, within
    the tolerance.
    """
    made = read_header(shipped_path(name, version))["made-with"]
    environment = shipped_weights.isa_environment(made["cpu-capability"])
    proc = subprocess.run(
        [sys.executable, "-m", "fedprime_core.tools.shipped_weights", "check", name],
        env={**os.environ, **(environment or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    held = {**made_with("probe"), "cpu-capability": made["cpu-capability"]}  # what the check process ran as
    if environment and not shipped_weights.software_differences(held, made):
        assert f"{name}: identical to" in proc.stdout, proc.stdout


def test_an_instruction_set_is_reached_only_downwards():
    here = torch.backends.cpu.get_cpu_capability()
    if here not in shipped_weights.X86_CAPABILITIES:
        assert shipped_weights.isa_environment("AVX2") is None
        return
    assert shipped_weights.isa_environment(here)["ATEN_CPU_CAPABILITY"] == here.lower()
    assert shipped_weights.isa_environment("DEFAULT")["ATEN_CPU_CAPABILITY"] == "default"
    assert shipped_weights.isa_environment("SVE256") is None
    if here != "AVX512":
        assert shipped_weights.isa_environment("AVX512") is None


def test_the_verdict_asks_bits_only_of_the_same_software():
    made = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "numpy": "2.4.6", "machine": "x86_64", "seed": 1}
    made["cpu-capability"] = "AVX2"
    wider = {**made, "cpu-capability": "AVX512"}
    newer = {**made, "transformers": "5.25.0"}
    near = {"same-names": True, "identical": False, "max-abs-diff": 0.003}
    far = {"same-names": True, "identical": False, "max-abs-diff": 0.5}
    assert shipped_weights.judge({**near, "identical": True, "max-abs-diff": 0.0}, made, made)[0]
    assert not shipped_weights.judge(near, made, made)[0]  # same software: the last bits must agree too
    ok, verdict = shipped_weights.judge(near, newer, made)
    assert ok and "transformers 5.24.0 -> 5.25.0" in verdict
    assert not shipped_weights.judge(far, newer, made)[0]
    ok, verdict = shipped_weights.judge(near, wider, made)
    assert ok and "cpu-capability AVX2 -> AVX512" in verdict
    reproduced = {**made, "reproduced-with": [{"transformers": "5.25.0"}]}  # check --record found the same bits
    assert not shipped_weights.software_differences(newer, reproduced)
    assert not shipped_weights.judge(near, newer, reproduced)[0]  # so 5.25.0 must give the bits again
    assert not shipped_weights.judge({"same-names": False, "identical": False, "max-abs-diff": None}, made, made)[0]
