"""Map a server's config onto the MCP SDK's transports.

Nothing here holds state: the pool asks for a fresh ``Client`` target per
connect. Secrets (headers, env) are unwrapped only at this boundary.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from mcpq.worker.config import MCPServerConfig
from mcpq.worker.contract.errors import MCPConnectionError

# How long an SSE stream may stay silent before the SDK gives up on it; a
# dropped stream is noticed by the pool and reopened, so this only bounds
# a half-open TCP connection.
SSE_READ_TIMEOUT = 300.0


def resolve_command(config: MCPServerConfig) -> str:
    """The executable for a stdio server, or a connection_error saying why not.

    A command with a path separator is taken relative to the server's ``cwd``
    (where it will run), a bare name is looked up on the server's PATH.
    """
    command = config.command or ""
    # Not retried: a missing executable does not appear within a call's backoff.
    details = {"server": config.name, "command": command, "phase": "connect", "retry_safe": False}
    if os.sep in command:
        path = os.path.join(config.cwd or os.getcwd(), command)
        if not os.access(path, os.X_OK):
            raise MCPConnectionError(
                f"server {config.name!r}: stdio command {command!r} does not exist or is not executable"
                + (f" (relative to cwd {config.cwd!r})" if config.cwd and not os.path.isabs(command) else ""),
                details=details,
            )
        return path
    path_env = (config.env_values().get("PATH")) or os.environ.get("PATH")
    found = shutil.which(command, path=path_env)
    if found is None:
        raise MCPConnectionError(
            f"server {config.name!r}: stdio command {command!r} was not found on PATH", details=details
        )
    return found


def stdio_parameters(config: MCPServerConfig) -> StdioServerParameters:
    command = resolve_command(config)
    env = dict(config.env_values())
    env["MCPQ_LAUNCH_PARENT"] = str(os.getpid())
    if "PATH" not in env and os.environ.get("PATH"):
        env["PATH"] = os.environ["PATH"]
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcpq.worker.launch", command, *config.args],
        env=env,
        cwd=config.cwd,
    )


def client_target(config: MCPServerConfig) -> Any:
    """What ``mcp.Client(...)`` takes for this server: stdio params or a transport."""
    if config.transport == "stdio":
        return stdio_parameters(config)
    assert config.url is not None  # the config model guarantees it for http/sse
    headers = config.header_values()
    if config.transport == "sse":
        return sse_client(
            config.url,
            headers=headers or None,
            timeout=config.connect_timeout,
            sse_read_timeout=SSE_READ_TIMEOUT,
        )
    return _streamable_http(
        config.url, headers, config.connect_timeout, max(config.timeout, SSE_READ_TIMEOUT)
    )


@asynccontextmanager
async def _streamable_http(
    url: str, headers: dict[str, str], connect_timeout: float, read_timeout: float
) -> AsyncIterator[Any]:
    # The SDK leaves a caller-supplied httpx client open; owning it here means
    # every closed session also closes its connection pool.
    timeout = httpx2.Timeout(connect_timeout, read=read_timeout)
    async with (
        create_mcp_http_client(headers=headers or None, timeout=timeout) as http_client,
        streamable_http_client(url, http_client=http_client) as streams,
    ):
        yield streams
