"""A site's resident worker: one backbone load per site, the same work as in-process, honest failures.

A real worker process (``python -m fedprime_core.site_worker``) serves one site folder of
tests/sites.py; the ClientApp side (:class:`~fedprime_core.site_worker.WorkerSite`) talks to
it as the ClientApp does in deployment. tests/test_e2e_deployment.py runs it under Flower.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedprime_core import runtime
from fedprime_core.config import config_to_dict, parse_run_config
from fedprime_core.node import node_setup
from fedprime_core.site_worker import (
    LocalSite,
    SiteWorkerError,
    WorkerFailure,
    WorkerSite,
    recv_frame,
    send_frame,
    site_for,
)
from tests.processes import ROOT
from tests.sites import make_sites

QUICK = {"tau": 6, "kappa": 2, "batch-size": 16, "text-max-length": 24}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return make_sites(tmp_path_factory.mktemp("sites"))


@pytest.fixture()
def worker(tiny_vilt):
    """A worker process on a short socket path (Unix socket paths are limited to ~108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="fpw-"))
    path = folder / "site.sock"
    log = (folder / "worker.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fedprime_core.site_worker", "--socket", str(path), "--parent-pid", str(os.getpid())],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stopped_here = False
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None, (folder / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker did not bind its socket"
            time.sleep(0.1)
        yield process, str(path)
    finally:
        if process.poll() is None:
            stopped_here = True
            process.terminate()
            process.wait(timeout=30)
        log.close()
    if stopped_here:
        assert not path.exists()  # a worker that is stopped removes its socket


def test_a_worker_loads_the_backbone_once_and_trains_like_the_clientapp_would(plan, tmp_path, worker):
    process, path = worker
    site = plan["sites"]["site-a"]
    node_config = {"data-dir": str(site["dir"]), "client-id": "site-a", "site-worker": path}
    cfg = parse_run_config({"dataset": "food101", "data-dir": str(plan["server"]), "missing-setting": "none", **QUICK})
    run_config = config_to_dict(cfg)
    remote = site_for(node_config, run_id=7)
    assert isinstance(remote, WorkerSite)
    setup = node_setup(run_config, node_config, 3)
    check = remote.check(setup)
    assert check["client"] == {"client-id": "site-a"} and check["site-check"]["ok"]
    assert check["site-check"]["num-train"] == site["rows"]
    state = runtime.initial_state(cfg)
    outcome = remote.train(setup, state, server_round=1)
    metrics, client = remote.evaluate(setup, outcome.state)
    status = remote.status()
    assert status["pid"] == process.pid and status["backbone-loads"] == 1 and status["served"] == 3
    # The same work as in this process (same seeds, same data): the same arrays and numbers.
    in_process = node_setup(run_config, {k: v for k, v in node_config.items() if k != "site-worker"}, 3)
    local = LocalSite().train(in_process, state, 1)
    assert sorted(outcome.state) == sorted(local.state)
    for name in local.state:
        np.testing.assert_allclose(outcome.state[name], local.state[name], rtol=1e-5, atol=1e-6)
    assert outcome.metrics["num-examples"] == local.metrics["num-examples"] == site["rows"]
    assert outcome.client == local.client and {k: v.tolist() for k, v in outcome.usage.items()} == {
        k: v.tolist() for k, v in local.usage.items()
    }
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] == 8
    assert client["client-id"] == outcome.client["client-id"]  # the evaluate reply names its client too
    # A new run reads the site's data again (it may have been fixed) but keeps the backbone.
    again = WorkerSite(path, run_id=8)
    again.check(setup)
    assert again.status()["backbone-loads"] == 1
    # A failure in the work comes back as the one-line reason the ClientApp would have sent itself.
    broken = node_setup(run_config, {**node_config, "data-dir": str(tmp_path / "gone")}, 3)
    assert again.check(broken)["site-check"]["ok"] is False
    with pytest.raises(WorkerFailure, match=r"^\[data\] DataError: dataset root .*gone' does not exist"):
        again.train(broken, state, 2)
    # A worker that is gone is an immediate, clear error: never a hang.
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    started = time.monotonic()
    with pytest.raises(SiteWorkerError, match="no site worker answers at .*scripts/start_supernode.sh"):
        again.train(setup, state, 2)
    assert time.monotonic() - started < 5


def test_a_worker_that_dies_mid_request_is_reported_at_once(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="fpw-"))
    path = str(folder / "dies.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def die_after_reading() -> None:
        connection, _ = server.accept()
        with connection, connection.makefile("rwb") as stream:
            recv_frame(stream)  # the request arrives, then the "worker" is gone

    thread = threading.Thread(target=die_after_reading)
    thread.start()
    try:
        with pytest.raises(SiteWorkerError, match="went away before it answered the evaluate request"):
            setup = node_setup({}, {"partition-id": 0, "num-partitions": 1}, 1)
            WorkerSite(path).evaluate(setup, {"w": np.ones(3, np.float32)})
    finally:
        thread.join(timeout=10)
        server.close()


def test_frames_carry_headers_and_arrays_of_any_shape(tmp_path):
    import io

    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 4), np.float16),
        "counts": np.array([3, 0, 1], np.int64),
    }
    buffer = io.BytesIO()
    send_frame(buffer, {"op": "x", "loss": np.float32(0.5), "n": np.int64(3)}, arrays)
    buffer.seek(0)
    header, back = recv_frame(buffer)
    assert header == {"op": "x", "loss": 0.5, "n": 3}
    for name, value in arrays.items():
        assert back[name].dtype == np.asarray(value).dtype and back[name].shape == np.asarray(value).shape
        np.testing.assert_array_equal(back[name], value)
        assert back[name].flags.writeable
    truncated = io.BytesIO(buffer.getvalue()[:-3])
    with pytest.raises(ConnectionError):
        recv_frame(truncated)
    with pytest.raises(ValueError, match="not a site-worker frame"):
        recv_frame(io.BytesIO(b"HTTP/1.1 200 OK\r\n\r\n"))


def test_the_clientapp_imports_no_torch_before_it_works_in_process():
    code = "import sys, client_app.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
