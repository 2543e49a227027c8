"""Shared test set-up: offline Hugging Face, quiet Flower, a tiny run configuration."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# As in the apps (server_app/__init__.py): torch threads that sleep rather than spin while
# they wait, so that tests on a busy machine are not 10x slower with 2 threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.groups import pytest_collection_modifyitems  # noqa: E402, F401 - a hook: pytest finds it here

# Two torch threads on the 2-core machines the project is tested on; one per process when
# pytest-xdist runs the fast tier in two worker processes (pytest -n 2), so they do not contend.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_vilt():
    """The offline pretrained tiny ViLT (generated once per machine, about a minute)."""
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_vilt

    return load_vilt(resolve_source("vilt", "tiny-vilt"))


@pytest.fixture()
def quick_config(tmp_path):
    """A small but real run configuration on the embedded dataset."""
    from fedprime_core.config import parse_run_config

    def make(**overrides):
        values = {
            "num-server-rounds": 2,
            "tau": 6,
            "kappa": 2,
            "batch-size": 32,
            "max-train-samples": 240,
            "max-test-samples": 80,
            "min-partition-size": 10,
            "results-dir": str(tmp_path / "results"),
            "min-available-nodes": 2,
        }
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return parse_run_config(values)

    return make


@pytest.fixture(scope="session")
def image_only_data(tiny_vilt):
    """Image-only generated train (384) and test (160) sets for tiny-vilt (the lean and minimal tests)."""
    import numpy as np

    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor
    from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor
    from tests.generated_data import CLASSES, one_modality_samples

    _, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)

    def dataset(count: int, seed: int) -> MultimodalDataset:
        return MultimodalDataset(
            one_modality_samples("image", count, seed), np.zeros(count, int), processor, CLASSES, cache_images=True
        )

    return dataset(384, 0), dataset(160, 1)


@pytest.fixture()
def federation():
    """A whole federation in this process: the real ServerApp and ClientApps on the loopback grid.

    ``federation(cfg, num_nodes=None, node_configs=..., offline=..., ...)`` runs ``cfg``
    to its end and returns the grid (every message sent and every reply);
    ``federation.run_dir(cfg)`` and ``federation.history(cfg)`` read what the run wrote
    (tests/loopback.py).
    """
    from tests.loopback import Federation

    return Federation()
