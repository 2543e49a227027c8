"""Sites are checked before round 1: a broken site is refused with its reasons, never asked again.

The real ServerApp and ClientApp on an in-process grid whose nodes name their own site
folders (tests/sites.py), two of them broken: one with rows of classes that are not in
``classes.txt``, one whose ``data-dir`` does not exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import MessageType

from fedprime_core import runtime
from fedprime_core.config import parse_run_config
from fedprime_core.failures import RunFailed
from fedprime_core.node import node_client
from server_app.sites import SiteVerdict, refusal_stops_run, setting_label, site_verdicts
from tests.loopback import LoopbackGrid
from tests.sites import make_sites

QUICK = {"tau": 6, "kappa": 2, "batch-size": 16, "text-max-length": 24}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    plan = make_sites(root)
    bad = root / "site-bad-class"
    shutil.copytree(plan["sites"]["site-a"]["dir"], bad)
    with (bad / "train.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "pizza margherita", "label": "pizza"}) + "\n")
        handle.write(json.dumps({"text": "tacos al pastor", "label": "tacos"}) + "\n")
    plan["bad-class"] = bad
    plan["missing"] = root / "no-such-folder"
    return plan


def config(plan, tmp_path, **values):
    base = {"dataset": "food101", "data-dir": str(plan["server"]), "missing-setting": "none", **QUICK}
    base["results-dir"] = str(tmp_path / "results")
    base.update({k.replace("_", "-"): v for k, v in values.items()})
    return parse_run_config(base)


def site_nodes(plan, with_good: tuple[str, ...]) -> list[dict]:
    nodes = [{"data-dir": str(plan["sites"][name]["dir"]), "client-id": name} for name in with_good]
    nodes.append({"data-dir": str(plan["bad-class"]), "client-id": "site-bad-class"})
    nodes.append({"data-dir": str(plan["missing"]), "client-id": "site-missing"})
    return nodes


def kinds_sent(grid: LoopbackGrid, node: int) -> list[str]:
    return [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == node]


def test_a_site_with_a_bad_class_and_one_without_its_folder_are_refused_before_round_1(
    plan, tmp_path, tiny_vilt, federation
):
    cfg = config(plan, tmp_path, run_name="refused", num_server_rounds=2, min_available_nodes=5, fraction_evaluate=1.0)
    grid = federation(cfg, node_configs=site_nodes(plan, ("site-a", "site-b", "site-c")))
    folder = Path(cfg.results_dir) / "refused"
    clients = json.loads((folder / "clients.json").read_text())
    bad, missing = clients["site-bad-class"], clients["site-missing"]
    assert bad["state"] == missing["state"] == "refused"
    # Every bad row is named, not only the first one that stopped the load.
    assert "train.jsonl:41 (line 41): class 'pizza' is not in" in bad["problems"][0]
    assert any("class 'tacos' is not in" in p for p in bad["problems"][1:])
    assert "does not exist or is not a folder" in missing["reason"] and str(plan["missing"]) in missing["reason"]
    assert all(clients[name]["state"] == "training" for name in ("site-a", "site-b", "site-c"))
    summary = (folder / "summary.md").read_text()
    assert "| site-bad-class | refused: " in summary and "class 'pizza' is not in" in summary
    assert "| site-missing | refused: " in summary and "does not exist" in summary
    rounds = json.loads((folder / "metrics.json").read_text())
    assert [(r["sampled"], r["accepted"], r["rejected"]) for r in rounds[1:]] == [(3, 3, 0), (3, 3, 0)]
    # Nodes 4 and 5 (the broken sites) got the identity query before round 1 and nothing else.
    assert kinds_sent(grid, 4) == kinds_sent(grid, 5) == [MessageType.QUERY]
    assert kinds_sent(grid, 1).count(MessageType.TRAIN) == 2


def test_a_run_left_with_too_few_sites_does_not_start_and_says_why(plan, tmp_path, tiny_vilt, federation):
    cfg = config(plan, tmp_path, run_name="too-few", min_train_nodes=2, min_available_nodes=3)
    with pytest.raises(RunFailed, match=r"2 site\(s\) refused before round 1 .*1 node\(s\) can train"):
        federation(cfg, node_configs=site_nodes(plan, ("site-a",)))
    folder = Path(cfg.results_dir) / "too-few"
    summary = (folder / "summary.md").read_text()
    assert "**Run failed before round 1:**" in summary and "min-train-nodes is 2" in summary
    assert "| site-missing | refused: " in summary and "| site-a | checked" in summary
    clients = json.loads((folder / "clients.json").read_text())
    assert clients["site-bad-class"]["state"] == "refused" and clients["site-a"]["state"] == "checked"
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"


def test_the_site_check_counts_what_training_will_see(plan, tmp_path, tiny_vilt):
    cfg = config(plan, tmp_path)
    for name, planted in plan["sites"].items():
        node = node_client({"data-dir": str(planted["dir"]), "client-id": name}, 1)
        check = runtime.site_check(cfg, node)
        assert check["ok"] and check["problems"] == []
        rows = planted["rows"]
        counted = [rows - planted["text-missing"] - planted["image-missing"], planted["text-missing"]]
        counted.append(planted["image-missing"])
        assert check["mixture"] == [round(n / rows, 4) for n in counted]  # the summary's mixture: the counted rows
        assert [check["complete"], check["text-missing"], check["image-missing"]] == counted
        assert check["num-classes-present"] == len(planted["classes"]) and check["num-classes"] == 8
        share = 100 * planted["text-missing"] / rows
        assert f"text-missing {planted['text-missing']} ({share:.0f}%)" in check["summary"]
    assert runtime.site_check(cfg, node_client({"partition-id": 0, "num-partitions": 2}, 1)) is None


def test_verdicts_refuse_permanent_failures_and_other_class_lists_and_decide_whether_to_start():
    census = {
        1: {"client-id": "a", "site-check": {"ok": True, "labels-fingerprint": "L", "summary": "40 rows"}},
        2: {"client-id": "b", "site-check": {"ok": True, "labels-fingerprint": "OTHER"}},
        3: {"client-id": "c", "site-check": {"ok": False, "problems": ["p1", "p2", "p3", "p4"]}},
        4: {"client-id": "0", "partition-id": 0, "num-partitions": 2},
    }
    failed = {5: ("config", "ConfigError: node config key 'data-dir' must be absolute"), 6: (None, "OOM")}
    verdicts = site_verdicts(census, failed, labels_fingerprint="L")
    assert [n for n, v in sorted(verdicts.items()) if v.refused] == [2, 3, 5]
    assert 6 not in verdicts  # a failure that may not recur: the rounds account for it
    assert "class list (fingerprint OTHER) differs from the server's (L)" in verdicts[2].reason
    assert verdicts[3].reason == "p1; p2; p3; and 1 more problem(s)"
    assert not verdicts[4].is_site and verdicts[1].describe() == "site a (node 1): ready: 40 rows"
    stop, _ = refusal_stops_run(verdicts, [1, 2, 3, 4, 5, 6], min_train=4, min_available=6)
    assert stop is not None and "3 site(s) refused before round 1" in stop and "3 node(s) can train" in stop
    stop, warning = refusal_stops_run(verdicts, [1, 2, 3, 4, 5, 6], min_train=3, min_available=6)
    assert stop is None and "fewer than min-available-nodes = 6" in warning
    assert refusal_stops_run({1: SiteVerdict(1, "a")}, [1], 1, 1) == (None, None)


def test_the_title_and_run_name_name_the_setting_that_applies():
    from server_app.app import default_run_name

    sites = parse_run_config({"dataset": "food101", "classes": "a,b", "missing-setting": "none", "seed": 3})
    assert setting_label(sites, sites=True) == "site data"
    assert setting_label(sites) == "none"  # no unused eta
    assert default_run_name(sites).startswith("fedprime-food101-none-s3-")
    drawn = parse_run_config({"missing-setting": "miss-text", "eta": 0.5})
    assert setting_label(drawn) == "miss-text, eta=0.5"
    assert setting_label(drawn, sites=True) == "site data + simulated miss-text, eta=0.5"
    assert default_run_name(drawn).startswith("fedprime-embedded-miss-text-eta0.5-s42-")
