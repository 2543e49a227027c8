"""The Docker Compose deployment (docker/): static checks always, the real demo when Docker runs.

The static tests parse docker/compose.yml and its GPU and TLS overrides with PyYAML and
check them against the installed flwr's own ``--help`` (so a flag renamed by a Flower
release fails here, not on a user's machine). The slow test runs ``docker/demo.sh``
end to end; it needs a reachable Docker engine and is skipped otherwise (CI has none).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
NUM_CLIENTS = 3


def readme_services() -> list[str]:
    """Service names in the first column of the Docker service table (docs/deployment.md)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text.split("\n## Docker demo\n", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([a-z0-9-]+)`", line.split("|")[1])
    return names


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def services(name: str = "compose.yml") -> dict[str, dict]:
    return load(name)["services"]


def merged(*names: str) -> dict[str, dict]:
    """Services after Compose's override rules for the keys used here (command replaced, rest merged)."""
    out: dict[str, dict] = {}
    for name in names:
        for svc, spec in services(name).items():
            out.setdefault(svc, {}).update(spec)
    return out


def flag_value(command: list[str], flag: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == flag:
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def node_config(command: list[str]) -> dict[str, object]:
    """The node config as flower-supernode reads it (``key=value`` items, TOML values)."""
    text = flag_value(command, "--node-config") or ""
    return {key: tomllib.loads(f"v = {value}")["v"] for key, value in (item.split("=", 1) for item in text.split())}


def compose_text(text: str) -> str:
    """A string as Compose hands it on: ``$$`` is its escape for ``$``."""
    return text.replace("$$", "$")


def role(spec: dict) -> str:
    """Which Flower binary a service runs (explicit entrypoint, else the app image's; the one a
    ``sh -c '... & exec BINARY "$@"'`` entrypoint execs, after starting something beside it)."""
    entry = spec.get("entrypoint")
    if isinstance(entry, list):
        if entry[:2] == ["sh", "-c"]:
            return re.search(r"exec (\S+) \"\$@\"", compose_text(entry[2])).group(1)
        return entry[0]
    return entry or "flower-superexec"


@functools.cache
def help_flags(binary: str) -> frozenset[str]:
    path = shutil.which(binary, path=str(Path(sys.executable).parent)) or shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def assert_flags_known(spec: dict, service: str) -> None:
    binary = role(spec)
    known = help_flags(binary)
    for arg in spec.get("command", []):
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in known, f"{service}: {binary} (the installed flwr) has no flag {flag}"


# ----------------------------------------------------------------------------- static


def test_compose_has_every_service_the_readme_names():
    svc = services()
    named = readme_services()
    assert len(named) >= 3 + 2 * NUM_CLIENTS, f"docs/deployment.md's Docker section names too few services: {named}"
    assert set(named) == set(svc), "docs/deployment.md's service table and docker/compose.yml disagree"
    for name in named:
        assert name in svc, f"docker/compose.yml lacks service {name!r}"
    assert len([s for s in svc if s.startswith("supernode-")]) >= 3


@pytest.mark.parametrize("files", [("compose.yml",), ("compose.yml", "compose.tls.yml")])
def test_every_flower_command_uses_flags_of_the_installed_flwr(files):
    for name, spec in merged(*files).items():
        if role(spec).startswith("flower-"):
            assert_flags_known(spec, name)


def test_supernodes_are_sites_with_their_own_data_and_executors():
    svc = services()
    nodes = {name: spec for name, spec in svc.items() if name.startswith("supernode-")}
    client_ids = []
    ports = {}
    for name, spec in nodes.items():
        cmd = spec["command"]
        assert role(spec) == "flower-supernode"
        assert flag_value(cmd, "--isolation") == "process", name
        assert flag_value(cmd, "--superlink") == "superlink:8000", name
        assert flag_value(cmd, "--host") == "0.0.0.0", name
        config = node_config(cmd)
        # A site: its own data folder (as its ClientApp executor sees it), no partition of shared data.
        assert config["data-dir"] == "/data" and "partition-id" not in config, name
        client_ids.append(config["client-id"])
        ports[name] = flag_value(cmd, "--port")
    assert sorted(client_ids) == [f"site-{i}" for i in range(len(nodes))], "client-ids must be site-0..site-N-1"

    # Each SuperNode has exactly one ClientApp executor, connected to its Runtime API.
    executors = {name: spec for name, spec in svc.items() if name.startswith("superexec-clientapp-")}
    targets = sorted(flag_value(spec["command"], "--runtime-api-address") for spec in executors.values())
    assert targets == sorted(f"{name}:{port}" for name, port in ports.items())


def test_every_site_executor_runs_the_site_worker_its_supernode_names():
    svc = services()
    for name, spec in svc.items():
        if not name.startswith("superexec-clientapp-"):
            continue
        node = node_config(svc[name.replace("superexec-clientapp-", "supernode-")]["command"])
        assert role(spec) == "flower-superexec", name
        script = compose_text(spec["entrypoint"][2])
        # The worker watches the shell ($$) that becomes flower-superexec.
        assert f"python -m fedprime_core.site_worker --socket {node['site-worker']} --parent-pid $$ &" in script
        assert script.endswith('exec flower-superexec "$@"'), name


def test_superlink_and_serverapp_executor():
    svc = services()
    link = svc["superlink"]["command"]
    assert role(svc["superlink"]) == "flower-superlink"
    assert flag_value(link, "--isolation") == "process"
    assert "--insecure" in link and flag_value(link, "--port") == "8000"
    # Only the SuperLink's port is published, and only on the host's loopback.
    assert svc["superlink"]["ports"] == ["127.0.0.1:${SUPERLINK_PORT:-8000}:8000"]
    for name, spec in svc.items():
        if name != "superlink":
            assert "ports" not in spec, f"{name} should not publish ports"
    server = svc["superexec-serverapp"]
    assert role(server) == "flower-superexec"
    assert flag_value(server["command"], "--runtime-api-address") == "superlink:8000"
    assert any(v.endswith(":/results") for v in server["volumes"]), "results must reach the host"


def test_volumes_model_cache_shared_read_only_and_each_site_mounts_only_its_own_folder():
    svc = services()
    data_volumes = []
    for name, spec in svc.items():
        if name.startswith("superexec-"):
            assert "model-cache:/cache:ro" in spec["volumes"], name
            env = spec["environment"]
            assert env["FEDPRIME_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
            assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        if name.startswith("superexec-clientapp-"):
            data = [v for v in spec["volumes"] if v.endswith(":/data:ro")]
            assert len(data) == 1 and len(spec["volumes"]) == 2, name  # the model cache and its own site, nothing else
            # The executor of supernode-i mounts the folder of that SuperNode's client-id.
            node = name.replace("superexec-clientapp-", "supernode-")
            site = node_config(svc[node]["command"])["client-id"]
            assert data[0] == f"${{FEDPRIME_SITES_DIR:-./.build/sites}}/{site}:/data:ro", name
            data_volumes.append(data[0])
    assert len(set(data_volumes)) == NUM_CLIENTS, "every site needs its own data folder"
    server = svc["superexec-serverapp"]["volumes"]
    assert "${FEDPRIME_SITES_DIR:-./.build/sites}/server:/data:ro" in server, "the server's own held-out folder"
    assert "model-cache:/cache" in svc["model-init"]["volumes"]
    assert set(load("compose.yml").get("volumes", {})) == {"model-cache"}


def test_demo_prepares_the_site_folders_the_compose_file_mounts():
    demo = (DOCKER / "demo.sh").read_text()
    assert "-m fedprime_core.data.prepare split" in demo and '--out "$FEDPRIME_SITES_DIR"' in demo
    assert '--missing-table "$HERE/missing-table.yaml"' in demo and "--num-sites 3" in demo
    assert 'missing-setting=\\"none\\"' in demo and 'data-dir=\\"/data\\"' in demo


def test_demo_does_not_wait_for_a_dead_site_and_keeps_the_model_cache_unless_clean():
    from fedprime_core.config import OPTIONS

    demo = (DOCKER / "demo.sh").read_text()
    sites = int(re.search(r"--num-sites (\d+)", demo).group(1))
    config = re.search(r'^RUN_CONFIG="([^"]+)"$', demo, re.MULTILINE).group(1)
    settings = dict(item.split("=", 1) for item in config.split())
    assert set(settings) <= {o.key for o in OPTIONS}, "every key the demo sets is a run-config option"
    assert int(settings["min-available-nodes"]) < sites  # a killed site does not stall the rounds
    assert 0 < float(settings["node-wait"]) < int(re.search(r"DEMO_TIMEOUT:-(\d+)", demo).group(1))
    downs = re.findall(r"compose down( -v)? --remove-orphans", demo)
    assert sorted(downs) == ["", " -v"] and 'if [ "$CLEAN" = 1 ]' in demo  # -v (the cache) only with --clean
    assert 'chown -R "$(id -u):$(id -g)"' in demo  # results belong to whoever ran it


def test_missing_table_gives_each_client_its_own_mixture():
    from fedprime_core.data.missing import load_missing_table

    table = load_missing_table(DOCKER / "missing-table.yaml", NUM_CLIENTS)
    assert table.shape == (NUM_CLIENTS, 3)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    assert len({tuple(row) for row in table}) == NUM_CLIENTS


def test_gpu_override_reserves_one_gpu_per_client():
    base = services()
    gpu = services("compose.gpu.yml")
    clients = sorted(name for name in base if name.startswith("superexec-clientapp-"))
    assert set(gpu) <= set(base), "the GPU override names a service compose.yml lacks"
    assert sorted(gpu) == clients
    device_ids = []
    for name in clients:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (dev,) = devices
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        ids = dev.get("device_ids")
        assert (ids is not None and len(ids) == 1 and "count" not in dev) or (ids is None and dev["count"] == 1), name
        device_ids.append(ids[0] if ids else None)
    if all(device_ids):
        assert len(set(device_ids)) == len(clients), "by default each client gets a GPU of its own"


def test_tls_override():
    base = services()
    tls = load("compose.tls.yml")
    svc = tls["services"]
    assert set(svc) <= set(base)
    link = svc["superlink"]["command"]
    assert "--insecure" not in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag_value(link, flag), flag
    for name in [n for n in base if n.startswith("supernode-")]:
        cmd = svc[name]["command"]
        assert "--insecure" not in cmd and flag_value(cmd, "--root-certificates"), name
        # The TLS variant must keep the node's identity.
        assert node_config(cmd) == node_config(base[name]["command"]), name
        assert flag_value(cmd, "--port") == flag_value(base[name]["command"], "--port"), name
    server = svc["superexec-serverapp"]["command"]
    assert "--insecure" not in server and flag_value(server, "--root-certificates")
    files = {s["file"] for s in tls["secrets"].values()}
    assert files == {"./certs/ca.crt", "./certs/server.pem", "./certs/server.key"}
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "docker/certs/" in ignored, "generated certificates must stay out of git"


def test_dockerfile_follows_flowers_layout():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG FLWR_VERSION\nARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}" in text
    assert "ARG TORCH_SPEC=" in text and "ARG TORCH_INDEX_URL=" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text


FLOWER_RELEASE = re.compile(r"flwr/(?:superlink|supernode|superexec|base):\d|FLWR_VERSION[=:-]+\d|flwr==\d")


@pytest.mark.parametrize("path", sorted(p.name for p in DOCKER.iterdir() if p.is_file()))
def test_no_docker_file_names_a_flower_release(path):
    """The Flower version of the images has one source: the host's flwr, read by docker/env.sh."""
    text = (DOCKER / path).read_text(errors="replace")
    found = FLOWER_RELEASE.findall(text)
    assert not found, (
        f"docker/{path} names a Flower release ({found}); take it from FLWR_VERSION, which "
        "docker/env.sh reads from the installed flwr, so images and the flwr CLI cannot disagree"
    )


def test_env_sh_takes_the_flower_version_from_the_installed_flwr():
    import flwr

    out = subprocess.run(
        ["bash", str(DOCKER / "env.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
    )
    assert out.returncode == 0, out.stderr
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", out.stdout, re.MULTILINE))
    assert exports["FLWR_VERSION"] == flwr.__version__
    assert exports["SUPERLINK_IMAGE"] == f"flwr/superlink:{flwr.__version__}"
    assert exports["SUPERNODE_IMAGE"] == f"flwr/supernode:{flwr.__version__}"
    assert exports["BASE_IMAGE"] == f"flwr/superexec:{flwr.__version__}"
    # compose.yml takes the images from these variables and stops with a hint without them.
    for name in ("superlink", "supernode-1"):
        image = services()[name]["image"]
        assert image.startswith("${SUPERLINK_IMAGE:?" if name == "superlink" else "${SUPERNODE_IMAGE:?"), image
        assert "docker/env.sh" in image


@pytest.mark.parametrize(
    "script", ["demo.sh", "build_image.sh", "make_base_image.sh", "local-engine.sh", "gen_certs.sh", "env.sh"]
)
def test_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- end to end


def docker_engine() -> str | None:
    """``None`` when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI on this machine"
    try:
        out = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if out.returncode != 0:
        return "no Docker engine is reachable (docker info failed); start one to run the demo test"
    return None


def run_demo(env: dict[str, str], timeout: float, *flags: str) -> subprocess.CompletedProcess:
    """Run docker/demo.sh; on a timeout, interrupt it so that its trap still tears the stack down."""
    proc = subprocess.Popen(
        ["bash", str(DOCKER / "demo.sh"), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # demo.sh's trap runs `docker compose down`
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"docker/demo.sh did not finish within {timeout} s:\n{(stdout + stderr)[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.flower
def test_demo_runs_end_to_end_and_carries_on_when_a_site_is_killed(tmp_path):
    """Round 1 with all three sites; then site 3 is killed and stays down, and rounds 2 and 3
    run on the two others (min-available-nodes=2 < 3 sites: nothing waits for the dead one)."""
    reason = docker_engine()
    if reason:
        pytest.skip(reason)
    from fedprime_core.backbones.generated import fedprime_cache_dir
    from fedprime_core.backbones.tiny import ensure_tiny_vilt

    ensure_tiny_vilt()  # seeds the containers' model cache: no second generation (minutes)
    env = {
        **os.environ,
        "FEDPRIME_RESULTS_DIR": str(tmp_path / "results"),
        "FEDPRIME_SITES_DIR": str(tmp_path / "sites"),
        "FEDPRIME_CACHE_SEED": str(fedprime_cache_dir()),
        # Unique per test run: pytest's tmp folder names repeat across sessions and checkouts,
        # and two runs sharing a project name tear down each other's containers.
        "COMPOSE_PROJECT_NAME": f"fedprime-test-{os.getpid()}-{secrets.token_hex(3)}",
    }
    out = run_demo(env, 3600, "--kill-site", "--clean")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    match = re.search(r"^RESULTS (.+)$", out.stdout, re.MULTILINE)
    assert match, log[-3000:]
    run = Path(match.group(1))

    clients = json.loads((run / "clients.json").read_text())
    manifest = json.loads((tmp_path / "sites" / "manifest.json").read_text())
    assert sorted(clients) == [site["client-id"] for site in manifest["sites"]] == ["site-0", "site-1", "site-2"]
    # Each site trained on its own folder, whose rows really miss what docker/missing-table.yaml drew.
    for site in manifest["sites"]:
        client = clients[site["client-id"]]
        assert client["data"] == "site" and client["simulated-text-missing"] == client["simulated-image-missing"] == 0
        total = client["num-train"] + client["num-val"]
        assert total == site["rows"]
        assert client["real-text-missing"] <= site["text-missing"]
        assert client["real-image-missing"] <= site["image-missing"]
    # site-0 mostly lacks texts, site-1 mostly images (docker/missing-table.yaml)
    assert clients["site-0"]["real-text-missing"] > 3 * clients["site-0"]["real-image-missing"]
    assert clients["site-1"]["real-image-missing"] > 3 * clients["site-1"]["real-text-missing"]
    records = [r for r in json.loads((run / "metrics.json").read_text()) if r["round"] > 0]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[0]["accepted"] == NUM_CLIENTS and records[0]["rejected"] == 0, records[0]
    assert [r["accepted"] for r in records[1:]] == [NUM_CLIENTS - 1] * 2, records  # site 3 is down
    assert all(np.isfinite(r["train-loss"]) for r in records)
    assert clients["site-2"]["last-round"] == 1 and clients["site-0"]["last-round"] == 3
    assert "killing site 3" in out.stdout
    assert "| final" in (run / "summary.md").read_text()
    # The results belong to whoever ran the demo, not to the containers' uid 49999.
    assert {p.stat().st_uid for p in run.rglob("*")} == {os.getuid()}
    # Nothing of the demo stays up.
    left = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}"],
        capture_output=True,
        text=True,
    )
    assert left.stdout.strip() == ""
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}"],
        capture_output=True,
        text=True,
    )
    assert volumes.stdout.strip() == ""  # --clean deleted the model cache too
