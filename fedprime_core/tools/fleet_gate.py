"""The sites' only door to the SuperLink: a proxy that passes the Fleet API and nothing else.

Flower 1.42's SuperLink serves its three HTTP APIs on one address (``--host``/``--port``;
``--control-api-address`` is accepted but deprecated and ignored): the **Fleet API**
(``/v1/fleet/...``, what SuperNodes call), the **Control API** (``/v1/control/...``, what
``flwr run``, ``flwr stop``, ``flwr ls`` and ``flwr supernode register`` call) and the
**Runtime API** (``/v1/runtime/...``, what the ServerApp calls). The Control API has no
authentication in Flower's open-source distribution (account login needs Flower's
enterprise OIDC plugin), so whoever reaches the SuperLink's address can register a
SuperNode of their own (defeating ``--enable-supernode-auth``), start, stop and list runs,
and call the Runtime API.

``scripts/start_superlink.sh`` therefore binds the SuperLink to ``127.0.0.1`` only and puts
this gate on the address the sites reach. The gate:

* forwards ``POST`` requests to the Fleet API's own paths (:data:`FLEET_PATHS`), body and
  headers (the SuperNode's signature headers included) as they are, to the SuperLink on
  loopback, and its answers back;
* refuses everything else with ``403`` and logs each refusal (rate-limited) with the
  caller's address: the SuperLink never sees those attempts;
* logs the SuperLink's own refusals of Fleet calls (a SuperNode key that was never
  registered: ``412``; a bad signature: ``401``) with the caller's address, which the
  SuperLink's own log line lacks;
* terminates TLS with the SuperLink's certificate (``--certs``) and talks TLS to the
  SuperLink, verified with the same CA.

The operator reaches the Control API on the SuperLink's machine, or from a workstation
through an SSH tunnel to its loopback port (docs/deployment.md, "TLS and SuperNode authentication").

    python -m fedprime_core.tools.fleet_gate --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \\
        [--certs DIR] [--watch-pid PID]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import ssl
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("fedprime.fleet_gate")

#: The Fleet API's routes in Flower 1.42 (``flwr/superlink/routers/fleet/router.py``); all POST.
FLEET_PATHS = frozenset(
    "/v1/fleet/" + name
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
#: The largest request body forwarded (Flower's own message limit, 512 MiB).
MAX_BODY = 512 * 1024 * 1024
#: Headers that belong to one hop, not to the request (RFC 9110 7.6.1), or that the proxy sets itself.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)


class RefusalLog:
    """Logs a refused attempt once per caller and path every ``every`` seconds, counting the rest."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def note(self, text: str, caller: str, path: str) -> None:
        now = time.monotonic()
        last, quiet = self._last.get((caller, path), (-self.every, 0))
        if now - last < self.every:
            self._last[(caller, path)] = (last, quiet + 1)
            return
        more = f" ({quiet} more since the last line)" if quiet else ""
        LOGGER.warning("%s%s", text, more)
        self._last[(caller, path)] = (now, 0)


def make_app(upstream: str, ca_file: str | None = None, transport=None):
    """The gate's ASGI app forwarding Fleet calls to ``upstream`` (``host:port``; HTTPS when ``ca_file``).

    ``transport``: an ``httpx`` transport to reach the SuperLink by (tests: Flower's SuperLink
    app in process); default: the network.
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    scheme = "https" if ca_file else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else False
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=120.0, transport=transport)
    refusals = RefusalLog()

    async def forward(request: Request) -> Response:
        path = request.url.path
        caller = request.client.host if request.client else "?"
        if request.method != "POST" or path not in FLEET_PATHS:
            refusals.note(
                f"refused {request.method} {path[:80]} from {caller}: this address serves the Fleet API only "
                "(the Control and Runtime APIs are on the SuperLink's loopback address)",
                caller,
                path,
            )
            return PlainTextResponse("this address serves the Fleet API only\n", status_code=403)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return PlainTextResponse("request body too large\n", status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return PlainTextResponse("request body too large\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        headers.append(("x-forwarded-for", caller))
        try:
            reply = await client.post(path, content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            LOGGER.error("cannot reach the SuperLink at %s for %s from %s: %s", upstream, path, caller, exc)
            return PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
        if reply.status_code >= 400:  # an unregistered key (412), a bad signature (401): logged with the caller
            refusals.note(
                f"the SuperLink refused {path} from {caller}: {reply.status_code} {reply.text[:120].strip()}",
                caller,
                path,
            )
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(content=reply.content, status_code=reply.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):  # noqa: ARG001
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


async def _watch(pid: int, server) -> None:
    """Stop the gate when the SuperLink process ``pid`` is gone."""
    while True:
        await asyncio.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            LOGGER.error("the SuperLink (process %d) is gone: stopping the Fleet gate", pid)
            server.should_exit = True
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.fleet_gate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT the sites connect to (their --superlink)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink (on loopback)")
    parser.add_argument(
        "--certs", help="folder with ca.crt, server.pem, server.key (scripts/gen_certs.sh); omit for HTTP"
    )
    parser.add_argument("--watch-pid", type=int, help="exit when this process (the SuperLink) is gone")
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s : fleet gate: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call otherwise
    ca = certfile = keyfile = None
    if args.certs:
        folder = Path(args.certs)
        ca, certfile, keyfile = (str(folder / name) for name in ("ca.crt", "server.pem", "server.key"))
        for path in (ca, certfile, keyfile):
            if not Path(path).is_file():
                raise SystemExit(f"missing {path}; create it with scripts/gen_certs.sh {folder} <hostnames>")
    host, port = _split(args.listen)
    config = uvicorn.Config(
        make_app(args.upstream, ca),
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    LOGGER.info(
        "serving the Fleet API of the SuperLink at %s on %s%s (Control and Runtime APIs not served here)",
        args.upstream,
        args.listen,
        " with TLS" if certfile else " without TLS",
    )

    async def serve() -> None:
        watcher = asyncio.create_task(_watch(args.watch_pid, server)) if args.watch_pid else None
        await server.serve()
        if watcher is not None:
            watcher.cancel()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
