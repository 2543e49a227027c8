"""Deployment on loopback with the scripts users run: SuperLink, SuperNodes, `flwr run . <connection>`.

Every process a test starts carries the test's private FLWR_HOME in its environment and is
stopped by that marker in a ``finally`` block, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.deployment import QUICK, Federation, records, wait_for_round
from tests.processes import ROOT, marked_pids, run_checked

pytestmark = [pytest.mark.slow, pytest.mark.flower]


def test_superlink_and_two_supernodes_with_different_node_configs(tmp_path, tiny_vilt):
    results = tmp_path / "results"
    fed = Federation(tmp_path)
    try:
        fed.add_node(0, 2)
        fed.add_node(1, 2)
        log = fed.run(f'num-server-rounds=2 results-dir="{results}" run-name="plain" {QUICK}')
        assert "FedPrime finished" in log, log[-3000:]
        run_id = re.search(r"Successfully started run (\d+)", log).group(1)
        stored = fed.flwr("log", run_id, "fed", "--show", timeout=120).stdout
    finally:
        fed.stop()
    # Each ClientApp ran in its own process on a SuperNode; its lines still reach the user.
    for text in (log, stored):
        for client in (0, 1):
            assert re.search(rf"client {client} \| round 2: loss \d+\.\d+ on \d+ samples", text), text[-3000:]
    assert "tiny-vilt: unpacking the shipped weights" in log and "generating tiny-vilt" not in log
    assert not marked_pids(f"FLWR_HOME={fed.home}")
    rounds, clients = records(results, "plain")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == 2 for r in rounds[1:])
    assert sorted(clients) == ["0", "1"]  # both node configs took part, each with its own shard
    assert clients["0"]["mixture"] != clients["1"]["mixture"]


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    run_checked([str(ROOT / "scripts/gen_certs.sh"), str(certs)], dict(os.environ), timeout=120)
    run_checked([str(ROOT / "scripts/gen_node_keys.sh"), str(keys), "2"], dict(os.environ), timeout=60)
    return certs, keys


def _flwr_as(fed: Federation, *args: str) -> subprocess.CompletedProcess:
    """``flwr`` without checking its exit code (an outsider's attempts fail)."""
    return subprocess.run(["flwr", *args], cwd=ROOT, env=fed.env, capture_output=True, text=True, timeout=120)


def _listening(port: int) -> set[str]:
    """The local addresses something listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_an_outsider_with_the_ca_or_an_unregistered_key_cannot_join_register_or_run(tmp_path, tiny_vilt):
    """The documented set-up (TLS, SuperNode authentication, the Fleet gate): an outsider holds
    ``ca.crt`` (every site has it) and a key pair of its own, and reaches the sites' address."""
    certs, keys = _keys(tmp_path)
    results = tmp_path / "results"
    fed = Federation(tmp_path, certs=certs, auth=True)
    try:
        fed.connect("outsider", fed.port)  # the address every site knows, with the CA every site holds
        tries = {
            "register": _flwr_as(fed, "supernode", "register", str(keys / "supernode_1.pub"), "outsider"),
            "run": _flwr_as(fed, "run", ".", "outsider", "--run-config", "num-server-rounds=1"),
            "ls": _flwr_as(fed, "ls", "outsider"),
            "stop": _flwr_as(fed, "stop", "1", "outsider"),
        }
        fed.flwr("supernode", "register", str(keys / "supernode_0.pub"), "fed", timeout=60)  # the operator
        fed.add_node(0, 2, key=keys / "supernode_0")
        intruder = fed.add_node(1, 2, key=keys / "supernode_1")  # its key was never registered
        assert intruder.wait(timeout=120) != 0
        one_node = "min-available-nodes=1 min-train-nodes=1"
        log = fed.run(f'num-server-rounds=1 results-dir="{results}" run-name="tls" {QUICK} {one_node}')
        assert "FedPrime finished" in log, log[-3000:]
        listing = fed.flwr("supernode", "list", "fed", timeout=60).stdout
        addresses = {"sites": _listening(fed.port), "control": _listening(fed.control)}
    finally:
        fed.stop()
    record = "\n".join(
        f"outsider {name}: exit {out.returncode}: {' '.join((out.stdout + out.stderr).split())[-300:]}"
        for name, out in tries.items()
    )
    (tmp_path / "outsider.txt").write_text(record)
    print(record)
    for name, out in tries.items():
        assert out.returncode != 0 and "403 Forbidden" in out.stdout + out.stderr, f"{name}: {out.stdout}{out.stderr}"
    assert "registered successfully" not in tries["register"].stdout
    superlink_log = (fed.logs / "superlink.log").read_text()
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs", "/v1/control/stop-run"):
        assert (
            f"fleet gate: refused POST {path} from 127.0.0.1: this address serves the Fleet API only" in superlink_log
        )
    assert "No SuperNode found with the given public key" in superlink_log  # the SuperLink's own line
    assert "fleet gate: the SuperLink refused /v1/fleet/activate-node from 127.0.0.1: 412" in superlink_log
    assert "Failed to activate SuperNode" in (fed.logs / "supernode-1.log").read_text()
    assert listing.count("online") == 1 and listing.count("registered") == 0
    assert addresses["control"] == {"127.0.0.1"}  # the Control API listens on loopback only
    rounds, clients = records(results, "tls")
    assert sorted(clients) == ["0"] and rounds[1]["accepted"] == 1


def test_without_the_gate_whoever_holds_the_ca_registers_a_node(tmp_path):
    """The record of what Flower 1.42 alone allows (``--expose-control-api``: its own layout, one
    port for everything): with only ``ca.crt``, an outsider registers a SuperNode of its own."""
    certs, keys = _keys(tmp_path)
    fed = Federation(tmp_path, certs=certs, auth=True, expose=True)
    try:
        attempt = _flwr_as(fed, "supernode", "register", str(keys / "supernode_1.pub"), "fed")
    finally:
        fed.stop()
    assert attempt.returncode == 0 and "registered successfully" in attempt.stdout, attempt.stdout


def test_killing_the_serverapp_mid_run_then_resuming_loses_and_repeats_no_round(tmp_path, tiny_vilt):
    results = tmp_path / "results"
    run_dir = results / "crash"
    fed = Federation(tmp_path)
    try:
        fed.add_node(0, 2)
        fed.add_node(1, 2)
        overrides = f'num-server-rounds=3 results-dir="{results}" run-name="crash" {QUICK} server-eval=false'
        fed.flwr("run", ".", "fed", "--run-config", overrides, timeout=120)  # returns once submitted
        wait_for_round(run_dir, 1)
        servers = [
            p
            for p in marked_pids(f"FLWR_HOME={fed.home}")
            if b"flwr-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert servers, "no ServerApp process found"
        for pid in servers:
            os.kill(pid, 9)  # the ServerApp dies mid-run, without any chance to clean up
        completed = json.loads((run_dir / "checkpoint.json").read_text())["round"]
        assert 1 <= completed < 3
        log = fed.run(f'num-server-rounds=3 resume="{run_dir}" {QUICK} server-eval=false')
        assert "FedPrime finished" in log, log[-3000:]
    finally:
        fed.stop()
    rounds, _ = records(results, "crash")
    assert [r["round"] for r in rounds] == [1, 2, 3]  # none lost, none repeated
    assert all(r["accepted"] == 2 for r in rounds)


def test_a_supernode_that_joins_late_takes_part_in_later_rounds(tmp_path, tiny_vilt):
    results = tmp_path / "results"
    run_dir = results / "late"
    fed = Federation(tmp_path)
    try:
        fed.add_node(0, 3)
        fed.add_node(1, 3)
        overrides = f'num-server-rounds=3 results-dir="{results}" run-name="late" {QUICK} server-eval=false'
        fed.flwr("run", ".", "fed", "--run-config", overrides, timeout=120)
        wait_for_round(run_dir, 1)
        fed.add_node(2, 3)  # connects while the run is under way
        wait_for_round(run_dir, 3)
    finally:
        fed.stop()
    rounds, clients = records(results, "late")
    assert rounds[0]["accepted"] == 2
    assert rounds[-1]["accepted"] == 3  # the late node was sampled once connected
    assert sorted(clients) == ["0", "1", "2"] and clients["2"]["last-round"] == 3


def test_a_supernode_that_never_starts_holds_the_run_up_only_for_node_wait(tmp_path, tiny_vilt):
    """Three partitions, min-available-nodes 3, the third SuperNode never starts: after node-wait the
    run goes on with the two that did (the round timeout, an hour by default, plays no part)."""
    results = tmp_path / "results"
    fed = Federation(tmp_path)
    try:
        fed.add_node(0, 3)
        fed.add_node(1, 3)
        fed.wait_for_nodes(2)  # the two are up: only the third is missing when the run starts
        overrides = (
            f'num-server-rounds=2 results-dir="{results}" run-name="two-of-three" {QUICK} server-eval=false '
            "min-available-nodes=3 min-train-nodes=2 node-wait=5.0"
        )
        log = fed.run(overrides, timeout=600)
    finally:
        fed.stop()
    assert "waited 5s (node-wait) for 3 nodes (min-available-nodes) before round 1; going on with the 2" in log, log
    rounds, clients = records(results, "two-of-three")
    assert [r["accepted"] for r in rounds] == [2, 2]
    assert sorted(clients) == ["0", "1"]


def test_three_sites_each_with_its_own_folder_missing_modalities_and_labels(tmp_path, tiny_vilt):
    """Each SuperNode points at its own small site folder (different real missing mixture and
    label subset); the server holds only its held-out folder. clients.json shows each site's counts.

    Each site runs its resident worker (scripts/start_supernode.sh starts it): every site loads
    its backbone once in the run, although Flower starts a ClientApp process for each of its 5
    messages (identity query, 2 x train, 2 x evaluate). A fourth site whose rows name a class
    outside classes.txt is refused before round 1 and never asked to train.
    """
    import shutil

    from tests.sites import make_sites

    plan = make_sites(tmp_path / "data")
    bad = tmp_path / "data" / "site-bad"
    shutil.copytree(plan["sites"]["site-a"]["dir"], bad)
    with (bad / "train.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "pizza margherita", "label": "pizza"}) + "\n")
    results = tmp_path / "results"
    fed = Federation(tmp_path)
    try:
        for name, site in plan["sites"].items():
            fed.add_site(name, site["dir"])
        fed.add_site("site-bad", bad)
        overrides = (
            f'num-server-rounds=2 results-dir="{results}" run-name="sites" dataset="food101" '
            f'data-dir="{plan["server"]}" missing-setting="none" text-max-length=24 min-available-nodes=4 '
            "tau=8 kappa=2 batch-size=16 fraction-evaluate=1.0"
        )
        log = fed.run(overrides)
        assert "FedPrime finished" in log, log[-3000:]
    finally:
        fed.stop()
    assert not marked_pids(f"FLWR_HOME={fed.home}")
    rounds, clients = records(results, "sites")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["sampled"] == 3 and r["accepted"] == 3 and r["rejected"] == 0 for r in rounds[1:])
    assert all(r["client-eval"]["num-examples"] == 3 * 8 for r in rounds[1:])  # each site's own dev split
    assert sorted(clients) == sorted([*plan["sites"], "site-bad"])
    assert clients["site-bad"]["state"] == "refused" and "class 'pizza' is not in" in clients["site-bad"]["reason"]
    assert re.search(r"site site-bad \(node \d+\): REFUSED, not sampled in this run: .*class 'pizza'", log)
    for name, planted in plan["sites"].items():
        client = clients[name]
        assert client["data"] == "site" and client["num-train"] == planted["rows"] and client["state"] == "training"
        assert client["real-text-missing"] == client["text-missing"] == planted["text-missing"]
        assert client["real-image-missing"] == client["image-missing"] == planted["image-missing"]
        assert client["skipped-no-modality"] == planted["skipped"]
        assert re.search(rf"site {name} \(node \d+\): ready: {planted['rows']} train / 8 validation rows", log)
        # One backbone load per site in the run (its worker's), one line per site per round in the stream.
        site_log = (fed.logs / f"supernode-{name}.log").read_text()
        assert site_log.count("loaded backbone tiny-vilt") == 1, site_log[-3000:]
        assert "site worker: serving" in site_log and site_log.count("site worker: train served") == 2
        assert len(re.findall(rf"client {name} \| ", log)) == 2, log
    assert len({c["labels-fingerprint"] for c in clients.values() if "labels-fingerprint" in c}) == 1
    assert "(site data)" in (results / "sites" / "summary.md").read_text()
