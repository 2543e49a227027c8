"""Site-local clients: each node trains on its own folder; the server keeps its held-out sets (or none).

Runtime functions directly, and the real ServerApp and ClientApp on an in-process grid
whose nodes name their own ``data-dir`` in the node config.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedprime_core import runtime
from fedprime_core.config import ConfigError, config_to_dict, parse_run_config
from fedprime_core.data.records import DataError
from fedprime_core.node import ClientNode, node_client, node_config
from tests.sites import DEV_PER_SITE, make_sites

QUICK = {"tau": 6, "kappa": 2, "batch-size": 16, "text-max-length": 24, "min-available-nodes": 2}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return make_sites(tmp_path_factory.mktemp("sites"))


def site_config(plan, tmp_path, **values):
    base = {"dataset": "food101", "data-dir": str(plan["server"]), "missing-setting": "none", **QUICK}
    base["results-dir"] = str(tmp_path / "results")
    base.update({k.replace("_", "-"): v for k, v in values.items()})
    return parse_run_config(base)


def node(plan, name: str, **extra):
    return node_client({"data-dir": str(plan["sites"][name]["dir"]), "client-id": name, **extra}, 5)


# ----------------------------------------------------------------------------- node config


def test_node_config_names_a_site_or_a_partition():
    site = node_client({"data-dir": "/site", "client-id": "hospital-3", "device": "cpu"}, 11)
    assert site.site_local and site.client_id == "hospital-3" and site.device == "cpu" and site.partition_id is None
    assert node_client({"data-dir": "/site"}, 11).client_id == "node-11"
    assert node_client({"data-dir": "~/site"}).data_dir == str(Path.home() / "site")
    shard = node_client({"partition-id": 2, "num-partitions": 4}, 11)
    assert not shard.site_local and shard.client_id == "2" and shard.seed_key == 3
    both = node_client({"data-dir": "/site", "partition-id": 0, "num-partitions": 2}, 11)
    assert both.site_local and both.client_id == "0"  # a partition id still names it
    assert node_client({"data-dir": "/s", "client-id": "x"}).seed_key == ClientNode("x").seed_key
    for config, message in [
        ({}, "node config names no data"),
        ({"partition-id": 1}, "lacks 'num-partitions'"),
        ({"partition-id": 4, "num-partitions": 4}, "must lie in 0..num-partitions-1"),
        ({"data-dir": 3}, "'data-dir' = 3 must be a string"),
        ({"data-dir": "relative/site"}, "must be an absolute path"),
        ({"data-dir": "/s", "device": "tpu"}, "'device' = 'tpu' is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            node_client(config, 1)
    cfg = parse_run_config({"device": "auto"})
    with pytest.raises(ConfigError, match='dataset="embedded"'):
        node_config(site, cfg)
    no_data = parse_run_config({"dataset": "food101", "classes": "a,b"})
    with pytest.raises(ConfigError, match="client 2: a node with partition-id carves its shard .* which is empty"):
        runtime.client_shard(no_data, shard)


# ----------------------------------------------------------------------------- site shards


def test_a_site_trains_on_all_of_its_data_with_its_real_missing_modalities(plan, tmp_path, tiny_vilt):
    cfg = site_config(plan, tmp_path)
    for name, planted in plan["sites"].items():
        client = node(plan, name)
        shard = runtime.client_shard(cfg, client)
        info = runtime.client_info(cfg, client, shard)
        assert len(shard.train) == planted["rows"] and len(shard.val) == DEV_PER_SITE  # all of it, nothing split
        assert info["client-id"] == name and info["data"] == "site" and "partition-id" not in info
        assert info["real-text-missing"] == info["text-missing"] == planted["text-missing"]
        assert info["real-image-missing"] == info["image-missing"] == planted["image-missing"]
        assert info["simulated-text-missing"] == info["simulated-image-missing"] == 0  # missing-setting none
        assert info["skipped-no-modality"] == planted["skipped"]
        # The mixture is the one the rows have, counted (the issue: [1, 0, 0] for a site with 20% text-missing).
        counted = [planted["rows"] - planted["text-missing"] - planted["image-missing"]]
        counted += [planted["text-missing"], planted["image-missing"]]
        assert info["mixture"] == [round(n / planted["rows"], 4) for n in counted]
        assert info["simulated-mixture"] == [1.0, 0.0, 0.0]  # nothing simulated on top (missing-setting none)
        # One label mapping for everyone, whatever classes the site holds.
        assert info["labels-fingerprint"] == runtime.label_space(cfg).fingerprint
        labels = {plan["classes"][s.label] for s in shard.train.samples}
        assert sorted(labels) == planted["classes"]


def test_simulated_missingness_applies_on_top_only_where_asked(plan, tmp_path, tiny_vilt):
    table = tmp_path / "table.yaml"
    table.write_text("site-a: {complete: 0.5, text-missing: 0.0, image-missing: 0.5}\ndefault: [1.0, 0.0, 0.0]\n")
    cfg = site_config(plan, tmp_path, missing_table=str(table))
    info = runtime.client_info(cfg, node(plan, "site-a"), runtime.client_shard(cfg, node(plan, "site-a")))
    assert info["real-text-missing"] == 8 and info["simulated-text-missing"] == 0
    assert info["simulated-image-missing"] == 16 and info["complete"] == 16  # half of the 32 complete rows
    other = runtime.client_info(cfg, node(plan, "site-b"), runtime.client_shard(cfg, node(plan, "site-b")))
    assert other["simulated-image-missing"] == 0 and other["simulated-mixture"] == [1.0, 0.0, 0.0]  # the default entry
    drawn = site_config(plan, tmp_path, missing_setting="miss-text", eta=0.5, missing_alpha=0.0)
    info = runtime.client_info(drawn, node(plan, "site-b"), runtime.client_shard(drawn, node(plan, "site-b")))
    assert info["real-image-missing"] == 10 and info["simulated-text-missing"] == 15  # eta 0.5 of the 30 complete


def test_a_site_without_dev_holds_out_part_of_its_train_for_validation(plan, tmp_path, tiny_vilt):
    folder = tmp_path / "site-d"
    shutil.copytree(plan["sites"]["site-c"]["dir"], folder)
    (folder / "dev.jsonl").unlink()
    cfg = site_config(plan, tmp_path, val_fraction=0.25)
    client = node_client({"data-dir": str(folder), "client-id": "site-d"})
    shard = runtime.client_shard(cfg, client)
    assert len(shard.val) == 10 and len(shard.train) == 28  # 38 usable rows
    again = runtime.client_shard(site_config(plan, tmp_path, val_fraction=0.25, seed=42), client)
    assert [s.uid for s in again.val.samples] == [s.uid for s in shard.val.samples]
    assert {s.uid for s in shard.val.samples}.isdisjoint(s.uid for s in shard.train.samples)


def test_site_errors_name_what_to_fix(plan, tmp_path, tiny_vilt):
    empty = tmp_path / "empty-site"
    empty.mkdir()
    (empty / "dev.jsonl").write_text('{"text": "t", "img": null, "label": "donuts"}\n')
    shutil.copyfile(plan["server"] / "classes.txt", empty / "classes.txt")
    cfg = site_config(plan, tmp_path)
    with pytest.raises(DataError, match="site empty: .* holds no training rows"):
        runtime.client_shard(cfg, node_client({"data-dir": str(empty), "client-id": "empty"}))
    odd = tmp_path / "odd-site"
    shutil.copytree(plan["sites"]["site-a"]["dir"], odd)
    with (odd / "train.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "tacos al pastor", "label": "tacos"}) + "\n")
    with pytest.raises(DataError, match=r"odd-site/train\.jsonl:41 \(line 41\): class 'tacos' is not in"):
        runtime.client_shard(cfg, node_client({"data-dir": str(odd), "client-id": "odd"}))


def test_server_label_space_without_data_and_held_out_folder_without_dev(plan, tmp_path, tiny_vilt):
    no_data = parse_run_config({"dataset": "mmimdb", "classes": "Drama,Comedy,Horror", **QUICK})
    labels = runtime.label_space(no_data)
    assert not runtime.has_data(no_data)
    assert labels.classes == ("Drama", "Comedy", "Horror") and not labels.multilabel and labels.metric == "macro_f1"
    multilabel = parse_run_config(
        {"dataset": "mmimdb", "classes": "Drama,Comedy", "mmimdb-protocol": "multilabel", **QUICK}
    )
    assert runtime.label_space(multilabel).multilabel
    assert runtime.build_model(no_data).num_classes == 3  # the server builds the model from the list alone
    server = tmp_path / "server-no-dev"
    shutil.copytree(plan["server"], server)
    (server / "dev.jsonl").unlink()
    sets = runtime.server_eval_sets(site_config(plan, tmp_path, data_dir=str(server), val_fraction=0.25))
    assert len(sets["val"]) == 12 and len(sets["full-modal"]) == 36  # 48 test rows, a quarter for validation
    val = {s.uid for s in sets["val"].samples}
    assert val.isdisjoint(s.uid for s in sets["full-modal"].samples)


# ----------------------------------------------------------------------------- in-process federation


def test_a_federation_of_sites_reports_each_site_and_refuses_another_class_list(
    plan, tmp_path, tiny_vilt, caplog, federation
):
    other = tmp_path / "site-other-labels"
    shutil.copytree(plan["sites"]["site-b"]["dir"], other)
    (other / "classes.txt").write_text("\n".join(reversed(plan["classes"])) + "\n")
    nodes = [{"data-dir": str(site["dir"]), "client-id": name} for name, site in plan["sites"].items()]
    nodes.append({"data-dir": str(other), "client-id": "site-other"})
    cfg = site_config(plan, tmp_path, run_name="sites", num_server_rounds=1, fraction_evaluate=1.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        federation(cfg, node_configs=nodes)
        run_dir = federation.run_dir(cfg)
    clients = json.loads((run_dir / "clients.json").read_text())
    assert sorted(clients) == ["site-a", "site-b", "site-c", "site-other"]
    for name, planted in plan["sites"].items():
        assert clients[name]["state"] == "training" and clients[name]["last-round"] == 1
        assert clients[name]["num-train"] == planted["rows"]
        assert clients[name]["real-image-missing"] == planted["image-missing"]
        assert clients[name]["real-text-missing"] == planted["text-missing"]
        assert clients[name]["client-val"]["round"] == 1 and clients[name]["client-val"]["num-examples"] == 8
    # The site with another class list is refused before round 1, and never asked to train.
    assert clients["site-other"]["state"] == "refused" and "class list" in clients["site-other"]["reason"]
    rounds = json.loads((run_dir / "metrics.json").read_text())
    assert rounds[1]["sampled"] == 3 and rounds[1]["accepted"] == 3 and rounds[1]["rejected"] == 0
    assert set(rounds[1]["eval"]) >= {"val", "full-modal"} and rounds[1]["client-eval"]["num-examples"] > 0
    assert sorted(rounds[1]["client-eval-per-client"]) == ["site-a", "site-b", "site-c"]
    summary = (run_dir / "summary.md").read_text()
    assert "| site-other | refused: its class list" in summary and "| site-a | training (last round 1) |" in summary


def test_a_server_without_data_leaves_evaluation_to_the_clients(plan, tmp_path, tiny_vilt, federation):
    nodes = [{"data-dir": str(site["dir"]), "client-id": name} for name, site in plan["sites"].items()]
    cfg = site_config(
        plan, tmp_path, data_dir="", classes=",".join(plan["classes"]), run_name="no-server-data", fraction_evaluate=1.0
    )
    cfg = parse_run_config({**config_to_dict(cfg), "num-server-rounds": 1})
    federation(cfg, node_configs=nodes)
    run_dir = federation.run_dir(cfg)
    rounds = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1] and "eval" not in rounds[0]  # no server-side evaluation at all
    assert rounds[0]["accepted"] == 3 and rounds[0]["client-eval"]["num-examples"] == 3 * DEV_PER_SITE
    assert np.isfinite(rounds[0]["client-eval"]["accuracy"])


def test_a_data_check_the_server_cannot_read_refuses_the_site_and_never_reaches_json():
    """A site's check is typed at the boundary like every other field a client sends: bytes, an
    unknown field or a non-boolean verdict is a reason, and the record that passes holds only plain values."""
    import json

    from fedprime_protocol.replies import parse_site_check_record

    good = {"ok": True, "problems": [], "warnings": ["train: row 3 skipped"], "num-train": 40, "summary": "ok\x1b[31m"}
    record, reasons = parse_site_check_record(good)
    assert reasons == [] and record["summary"] == "ok?[31m"  # control characters never reach a log line
    json.dumps(record)
    for bad, why in (
        ({**good, "note": b"\x00\x01"}, "unknown field 'note'"),
        ({**good, "ok": 1}, "'ok' must be true or false"),
        ({**good, "warnings": [b"x"]}, "'warnings' must be a list of strings"),
        ({**good, "num-train": 2**80}, "'num-train' must lie in"),
        ({k: v for k, v in good.items() if k != "ok"}, "'ok'"),
    ):
        record, reasons = parse_site_check_record(bad)
        assert reasons and why in "; ".join(reasons), (bad, reasons)
