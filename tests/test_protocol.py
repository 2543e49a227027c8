"""The layers: the apps share the wire protocol (fedprime_protocol), never each other; the core imports no Flower."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedprime_core import runtime
from fedprime_core.node import node_client
from fedprime_protocol.messages import CLIENT, identity_reply_content

ROOT = Path(__file__).resolve().parents[1]
#: package -> top-level packages it must never import.
FORBIDDEN = {
    "fedprime_core": {"flwr", "fedprime_protocol", "server_app", "client_app"},
    "fedprime_protocol": {"server_app", "client_app"},
    "server_app": {"client_app"},
    "client_app": {"server_app"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (anywhere in it, lazily inside a function too)."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_its_layer_must_not(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    wrong = {
        str(m.relative_to(ROOT)): sorted(imported_packages(m) & FORBIDDEN[package])
        for m in modules
        if imported_packages(m) & FORBIDDEN[package]
    }
    assert not wrong, wrong


def test_the_scan_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from server_app.strategy import FedPrimeStrategy\n    import flwr.app\n")
    assert imported_packages(module) >= {"server_app", "flwr"}


def test_the_identity_reply_is_the_identity_part_of_the_client_info_record(quick_config, tiny_vilt):
    cfg = quick_config()
    node = node_client({"partition-id": 1, "num-partitions": 3}, 12)
    identity = node.describe()
    assert identity == {"client-id": "1", "partition-id": 1, "num-partitions": 3}
    assert dict(identity_reply_content(identity).config_records[CLIENT]) == identity
    info = runtime.client_info(cfg, node, runtime.client_shard(cfg, node))
    assert {k: info[k] for k in ("client-id", "partition-id")} == {"client-id": "1", "partition-id": 1}
    assert info["num-train"] > 0 and "backbone-fingerprint" in info
    named = node_client({"partition-id": 0, "num-partitions": 2, "client-id": "clinic-a"}, 3)
    assert named.describe() == {"client-id": "clinic-a", "partition-id": 0, "num-partitions": 2}
    assert node_client({"data-dir": "/site", "client-id": "site-b"}, 4).describe() == {"client-id": "site-b"}


@pytest.mark.parametrize("method", ["centralized-p", "fedprime"])
def test_every_methods_client_record_passes_the_servers_parser(quick_config, tiny_vilt, method):
    """Regression: the centralized owner (no partition: its shard's partition-id is -1) sent
    'partition-id: -1', which the server's parser rejects, so every centralized-p round was skipped."""
    from fedprime_protocol.replies import parse_client_record

    cfg = quick_config(method=method)
    node = node_client({"partition-id": 0, "num-partitions": 1 if method == "centralized-p" else 2}, 7)
    info = runtime.client_info(cfg, node, runtime.client_shard(cfg, node))
    parsed, reasons = parse_client_record(info)
    assert reasons == [] and parsed["num-train"] == info["num-train"] > 0
    assert ("partition-id" in info) == (method != "centralized-p")
