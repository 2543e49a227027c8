"""The Fleet gate in front of Flower's own SuperLink app: Fleet calls pass, nothing else does.

The SuperLink is Flower 1.42's real FastAPI app (``flwr.superlink.main.create_app``, in-memory
state), reached in process; the deployment test (tests/test_e2e_deployment.py) runs the gate
with ``scripts/start_superlink.sh`` and real ``flwr`` commands.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from flwr.superlink.main import create_app
from flwr.superlink.routers.fleet.router import router as fleet_router
from starlette.testclient import TestClient

from fedprime_core.tools.fleet_gate import FLEET_PATHS, make_app

PROTOBUF = {"content-type": "application/protobuf"}


@pytest.fixture(scope="module")
def superlink():
    return create_app()


@pytest.fixture()
def gate(superlink, caplog):
    caplog.set_level(logging.INFO, logger="fedprime.fleet_gate")
    app = make_app("superlink:9093", transport=httpx.ASGITransport(app=superlink))
    with TestClient(app) as client:
        yield client


def test_the_gate_knows_exactly_flowers_fleet_routes():
    assert FLEET_PATHS == {route.path for route in fleet_router.routes}


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/runtime/get-nodes"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/get-run/"),
        ("GET", "/v1/fleet/get-run"),
        ("GET", "/docs"),
    ],
)
def test_everything_but_the_fleet_api_is_refused_and_logged(gate, superlink, caplog, method, path):
    reply = gate.request(method, path, content=b"", headers=PROTOBUF)
    assert reply.status_code == 403 and "Fleet API only" in reply.text
    arrived = path.replace("/v1/fleet/../", "/v1/")  # the client resolves the dots before sending
    assert f"refused {method} {arrived} from testclient" in caplog.text


def test_the_control_api_the_gate_refuses_is_open_on_the_superlink_itself(superlink):
    """Why the gate: Flower's SuperLink answers anyone's Control API call (no login in 1.42's open source)."""
    with TestClient(superlink) as direct:
        assert direct.post("/v1/control/list-runs", content=b"", headers=PROTOBUF).status_code == 200


def test_fleet_calls_reach_the_superlink_and_its_refusals_are_logged_with_the_caller(gate, caplog):
    reply = gate.post("/v1/fleet/get-run", content=b"", headers=PROTOBUF)
    assert reply.status_code == 401 and "Invalid SuperNode authentication" in reply.text  # the SuperLink's answer
    assert "the SuperLink refused /v1/fleet/get-run from testclient: 401" in caplog.text


def test_an_unreachable_superlink_is_a_502_not_a_crash(caplog):
    app = make_app("127.0.0.1:9")  # discard port: nothing listens
    with TestClient(app) as client:
        assert client.post("/v1/fleet/get-run", content=b"").status_code == 502
    assert "cannot reach the SuperLink" in caplog.text
