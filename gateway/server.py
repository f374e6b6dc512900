"""The gateway's MCP server: the SDK's lowlevel ``Server`` with the fleet as its tools.

``tools/list`` is the catalog (:mod:`mcpq.gateway.catalog`), ``tools/call``
goes through the queue (:mod:`mcpq.gateway.calls`). A watcher re-reads the
fleet's tool-map version and tells clients when the catalog changed:
``notifications/tools/list_changed`` on handshake-era sessions, a
``subscriptions/listen`` event on 2026-07-28 ones.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpq.gateway.calls import Calls
from mcpq.gateway.catalog import EVERYTHING, Catalog, Exposure
from mcpq.gateway.extensions import apply_extensions
from mcpq.gateway.metrics import GatewayMetrics
from mcpq.gateway.results import request_error
from mcpq.gateway.tasks import TaskOptions, TasksExtension
from mcpq.producer.aio import AsyncToolQueue
from mcpq.worker.contract.errors import MCPError
from mcpq.worker.contract.version import package_version

log = logging.getLogger("mcpq.gateway")

#: Seconds between looks at the fleet's tool-map version.
WATCH_INTERVAL = 0.25
#: Handshake-era sessions remembered for list-changed notices (the oldest are forgotten beyond it).
MAX_NOTIFIED_SESSIONS = 10_000
#: Marks a connection already remembered (in its per-connection ``state``).
_NOTIFIED = "mcpq.gateway.notified"


class GatewayServer(Server[Any]):
    """The lowlevel server with ``tools.listChanged`` declared on handshake-era sessions too."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


class Gateway:
    """Everything one gateway process serves, over HTTP or stdio.

    :param queue: the queue calls go through (the gateway closes it when it stops).
    :param exposure: which of the fleet's tools to offer (default: all).
    :param tasks: when calls are answered as tasks (Tasks extension; default :class:`TaskOptions`).
    """

    def __init__(
        self,
        queue: AsyncToolQueue,
        exposure: Exposure = EVERYTHING,
        tasks: TaskOptions | None = None,
    ) -> None:
        self.queue = queue
        self.catalog = Catalog(queue.tools, queue.tools_version, exposure)
        self.metrics = GatewayMetrics(queue.settings.metrics_max_tools)
        self.metrics.sessions.set_function(lambda: len(self._sessions))
        self.calls = Calls(queue, self.catalog, self.metrics)
        self.bus = InMemorySubscriptionBus()
        self._sessions: dict[int, ServerSession] = {}
        self.server = GatewayServer(
            "mcpq-gateway",
            version=package_version(),
            instructions="Every tool of an mcpq fleet; each call is queued and answered by a worker.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_subscriptions_listen=ListenHandler(self.bus),
        )
        # Long calls as tasks for clients that declare io.modelcontextprotocol/tasks (SEP-2663).
        self.tasks = TasksExtension(queue, self.calls, tasks)
        apply_extensions(self.server, [self.tasks], self._call_tool)

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._remember(ctx)
        try:
            entries = await self.catalog.entries()
        except MCPError as exc:  # the state Redis is unreachable: say so, no traceback
            raise request_error(exc.code, exc.message) from None
        return types.ListToolsResult(
            tools=[types.Tool.model_validate(e.definition) for e in entries.values()]
        )

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        self._remember(ctx)
        return await self.calls(ctx, params)

    def _remember(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """Keep a handshake-era session to notify when the catalog changes, until its connection closes."""
        if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return  # they listen with subscriptions/listen
        # The SDK builds a ServerSession per request; its Connection (kept private
        # by ServerSession) is what lives as long as the client's session.
        connection = ctx.session._connection
        if connection.state.get(_NOTIFIED):
            return
        connection.state[_NOTIFIED] = True
        key = id(connection)
        if len(self._sessions) >= MAX_NOTIFIED_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[key] = ctx.session
        # Forgotten when the connection closes (the client's DELETE, an idle expiry, stdin closed).
        connection.exit_stack.callback(self._sessions.pop, key, None)

    async def watch(self) -> None:
        """Until cancelled: tell clients whenever the fleet's tools change."""
        failing = False
        while True:
            await anyio.sleep(WATCH_INTERVAL)
            try:
                changed = await self.catalog.refresh()
            except Exception as exc:  # the state Redis is down: keep serving what we know
                if not failing:  # once per outage, not four times a second
                    log.warning("cannot re-read the fleet's tools (serving the last ones read): %s", exc)
                failing = True
                continue
            if failing:
                log.info("the fleet's tools can be read again")
                failing = False
            if changed:
                await self._announce()

    async def _announce(self) -> None:
        log.info("the fleet's tools changed (tool-map version %s)", self.catalog.version)
        await self.bus.publish(ToolsListChanged())
        for key, session in list(self._sessions.items()):
            try:
                with anyio.fail_after(1.0):
                    await session.send_tool_list_changed()
            except Exception:  # a closed session: forget it
                self._sessions.pop(key, None)

    async def close(self) -> None:
        """Stop: calls abandoned from now on are left to finish in the fleet."""
        self.calls.closing = True
        with contextlib.suppress(Exception):
            await self.queue.close()
