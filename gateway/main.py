"""Run the gateway: ``mcpq gateway`` over Streamable HTTP, ``mcpq gateway --stdio`` for desktop clients."""

from __future__ import annotations

import logging
import sys

import anyio
from mcp.server.stdio import stdio_server

from mcpq.gateway.catalog import EVERYTHING, Exposure
from mcpq.gateway.http import DEFAULT_MAX_REQUEST_BYTES, check_exposure, create_app
from mcpq.gateway.server import Gateway
from mcpq.gateway.tasks import TaskOptions
from mcpq.producer.aio import AsyncToolQueue
from mcpq.worker.contract.settings import Settings

log = logging.getLogger("mcpq.gateway")


def serve_http(
    settings: Settings,
    host: str,
    port: int,
    *,
    exposure: Exposure = EVERYTHING,
    allowed_hosts: tuple[str, ...] = (),
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tasks: TaskOptions | None = None,
) -> None:
    """Serve the gateway over Streamable HTTP at ``http://HOST:PORT/mcp`` until interrupted.

    :param settings: where the broker, result backend and state Redis are; the gateway token.
    :param host: the interface to listen on (not loopback: needs ``MCPQ_GATEWAY_TOKEN``).
    :param port: the TCP port.
    :param exposure: which of the fleet's tools to offer (default: all).
    :param allowed_hosts: more Host header names clients may use (DNS-rebinding protection).
    :param max_request_bytes: the largest request body.
    :param tasks: when calls are answered as tasks (None: the defaults).
    :raises ConfigError: a non-loopback host without a token.
    """
    import uvicorn

    token = settings.gateway_token
    check_exposure(host, token)
    if not token:
        log.warning("MCPQ_GATEWAY_TOKEN is not set: serving loopback (%s) only, with no token", host)
    gateway = Gateway(AsyncToolQueue(settings), exposure, tasks)
    app = create_app(
        gateway,
        host=host,
        port=port,
        token=token,
        allowed_hosts=allowed_hosts,
        max_request_bytes=max_request_bytes,
    )
    log.info("mcpq gateway on http://%s:%d/mcp", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def serve_stdio(
    settings: Settings, *, exposure: Exposure = EVERYTHING, tasks: TaskOptions | None = None
) -> None:
    """Serve the gateway over this process's stdin and stdout until the client closes them.

    :param settings: where the broker, result backend and state Redis are.
    :param exposure: which of the fleet's tools to offer (default: all).
    :param tasks: when calls are answered as tasks (None: the defaults).
    """

    async def run() -> None:
        gateway = Gateway(AsyncToolQueue(settings), exposure, tasks)
        server = gateway.server
        try:
            async with stdio_server() as (read, write), anyio.create_task_group() as tg:
                tg.start_soon(gateway.watch)
                await server.run(read, write, server.create_initialization_options())
                tg.cancel_scope.cancel()
        finally:
            await gateway.close()

    # Logs go to stderr: stdout is the protocol.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    anyio.run(run)
