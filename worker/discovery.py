"""Discovery: list every server's tools (all pages) and publish them.

Runs on demand (a tool not yet known, a stale list, ``mcpq.discover``), after
every (re)connect's handshake, and when a server says its tools changed. One
discovery per server is in flight per process at a time; concurrent callers
share it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mcp import Client

from mcpq.worker.contract.errors import MCPError, ProtocolError
from mcpq.worker.pool import ConnectionPool, OutcomeError
from mcpq.worker.registry import MCPServerRegistry, ToolSet

log = logging.getLogger(__name__)

#: A paginator that never ends must not hang discovery.
MAX_PAGES = 100
#: A tool missing from a fresh list is not worth re-listing more often than this.
MIN_FORCED_INTERVAL = 2.0


class Discovery:
    def __init__(self, registry: MCPServerRegistry, pool: ConnectionPool) -> None:
        self.registry = registry
        self.pool = pool
        self._inflight: dict[str, asyncio.Future[ToolSet | MCPError]] = {}

    def ensure(self, servers: list[str], deadline: float, *, force: bool = False) -> dict[str, MCPError]:
        """Discover the servers whose tool list is missing or stale (all of them
        with ``force``); return the failures by server. Never raises for a server."""
        todo = []
        for name in servers:
            toolset = self.registry.toolset(name)
            recently = toolset is not None and time.time() - toolset.discovered_at < MIN_FORCED_INTERVAL
            if toolset is None or self.registry.is_stale(name) or (force and not recently):
                todo.append(name)
        if not todo:
            return {}
        budget = max(deadline - time.monotonic(), 0.001)
        results = self.pool.run(self._discover_many(todo, deadline), timeout=budget + 5)
        return {name: r for name, r in results.items() if isinstance(r, MCPError)}

    async def _discover_many(self, servers: list[str], deadline: float) -> dict[str, ToolSet | MCPError]:
        outcomes = await asyncio.gather(*(self._discover_shared(s, deadline) for s in servers))
        return dict(zip(servers, outcomes, strict=True))

    async def _discover_shared(self, server: str, deadline: float) -> ToolSet | MCPError:
        running = self._inflight.get(server)
        if running is None:
            running = asyncio.ensure_future(self._discover(server, deadline))
            self._inflight[server] = running
            running.add_done_callback(lambda _f: self._inflight.pop(server, None))
        outcome: ToolSet | MCPError = await asyncio.shield(running)
        return outcome

    async def _discover(self, server: str, deadline: float) -> ToolSet | MCPError:
        try:
            tools = await self.pool.with_session(server, deadline, _list_all_tools, idempotent=True)
        except OutcomeError as exc:
            log.warning("discovery of %r failed: %s", server, exc.outcome.error.message)
            exc.outcome.error.details.setdefault("retry_safe", exc.outcome.retryable)
            exc.outcome.error.details.setdefault("phase", "discovery")
            return exc.outcome.error
        except MCPError as exc:
            log.warning("discovery of %r failed: %s", server, exc.message)
            return exc
        toolset = ToolSet(tools={t["name"]: t for t in tools}, discovered_at=time.time())
        await asyncio.to_thread(self.registry.publish_discovery, server, toolset)
        return toolset

    def refresh_soon(self, server: str) -> None:
        """Called on the loop when a server announces that its tools changed."""
        self.registry.mark_stale(server)
        deadline = time.monotonic() + self.registry.get(server).connect_timeout + 30
        self.pool.spawn(self._discover_shared(server, deadline))


async def _list_all_tools(client: Client) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor, cache_mode="refresh")
        tools += [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise ProtocolError(f"tools/list did not end after {MAX_PAGES} pages")
