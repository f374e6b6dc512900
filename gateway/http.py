"""The gateway over Streamable HTTP: ``/mcp`` behind a bearer token, ``/healthz`` and ``/metrics`` open.

Who may call: with ``MCPQ_GATEWAY_TOKEN`` set, every request to ``/mcp``
needs ``Authorization: Bearer <token>`` (compared in constant time); without
it the gateway serves loopback only (:func:`check_exposure`). The SDK's
DNS-rebinding protection (Host and Origin checks) is always on.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpq.gateway.server import Gateway
from mcpq.worker.contract.errors import ConfigError

MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
#: Paths open without the token: they show counts and names, never run a tool.
OPEN_PATHS = frozenset({HEALTH_PATH, METRICS_PATH})
#: Largest request body accepted (bytes); bigger ones get 413 before any parsing.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
_HAS_PORT = re.compile(r":(\d+|\*)$")


def is_loopback(host: str) -> bool:
    """True if ``host`` (an interface name or address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve tools to the network without a token.

    :raises ConfigError: ``host`` is not loopback and no ``MCPQ_GATEWAY_TOKEN`` is set.
    """
    if token or is_loopback(host):
        return
    raise ConfigError(
        f"mcpq gateway: --host {host} would serve every tool of the fleet to the network without a token; "
        "set MCPQ_GATEWAY_TOKEN (clients send it as 'Authorization: Bearer ...') or bind to 127.0.0.1",
        details={"setting": "MCPQ_GATEWAY_TOKEN"},
    )


def security_for(host: str, port: int, allowed_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """DNS-rebinding protection: the Host headers a client may use, and the matching Origins.

    :param host: the interface the gateway listens on.
    :param port: its port.
    :param allowed_hosts: more ``host[:port]`` values (the names clients use behind a proxy or in compose).
    """
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        hosts.append(f"{host}:{port}")
    for name in allowed_hosts:
        hosts.append(name if _HAS_PORT.search(name) else f"{name}:{port}")
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


class BearerToken:
    """ASGI middleware: every request except ``/healthz`` and ``/metrics`` carries the gateway's token.

    :param app: the app behind it.
    :param token: the token (None: no check; the gateway is then loopback-only).
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": "unauthorized", "message": "send 'Authorization: Bearer <MCPQ_GATEWAY_TOKEN>'"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer realm="mcpq-gateway"'),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(
    gateway: Gateway,
    *,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Sequence[str] = (),
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> ASGIApp:
    """The ASGI app serving ``gateway`` at ``/mcp`` (both protocol eras) and ``/healthz``.

    :param gateway: what to serve.
    :param host: the interface it listens on (for the Host checks).
    :param port: its port.
    :param token: the bearer token clients must send (None: none).
    :param allowed_hosts: more Host names clients may use.
    :param max_request_bytes: the largest request body.
    """
    sdk_app = gateway.server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=security_for(host, port, allowed_hosts),
        max_request_body_size=max_request_bytes,
        host=host,
    )

    async def health(_: Request) -> JSONResponse:
        try:
            with anyio.fail_after(5):
                await gateway.catalog.refresh()  # raises when the state Redis is unreachable
                entries = await gateway.catalog.entries()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse(
            {"status": "ok", "tools": len(entries), "tool_map_version": gateway.catalog.version}
        )

    async def metrics(_: Request) -> Response:
        body = await gateway.metrics.exposition(gateway.queue.breakers)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg, gateway.server.session_manager.run():
            tg.start_soon(gateway.watch)
            try:
                yield
            finally:
                await gateway.close()
                tg.cancel_scope.cancel()

    routes: list[BaseRoute] = [
        Route(HEALTH_PATH, health, methods=["GET"]),
        Route(METRICS_PATH, metrics, methods=["GET"]),
        *sdk_app.routes,
    ]
    app: Any = Starlette(routes=routes, lifespan=lifespan)
    return BearerToken(app, token)
