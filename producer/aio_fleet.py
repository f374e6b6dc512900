"""The fleet's shared state on the asyncio face: servers, tools, breakers, health.

A mixin of :class:`~mcpq.producer.aio.AsyncToolQueue`. Reads and writes of the
state Redis run the plans of :mod:`mcpq.producer.fleet_state` on an asyncio
client, so they are the sync face's own, with no thread. ``health`` and
``discover`` wait for a worker's answer to an admin task: they run the sync
face's implementation on a pool of threads of their own (at most
:data:`ADMIN_THREADS` at once; more wait their turn), since they are rare
operator requests, not calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio as aredis
from celery import states

from mcpq.producer import fleet_state
from mcpq.producer.cancelling import checked_call_id, final_result
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.plans import Plan, run_plan_async
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import is_unreachable, unreachable_error

if TYPE_CHECKING:
    from mcpq.producer.queue import ToolQueue

T = TypeVar("T")

#: Admin tasks (health, discover) waiting for a worker at once, per queue.
ADMIN_THREADS = 16


class AsyncFleetState:
    """What AsyncToolQueue offers besides calls; it provides the attributes below."""

    settings: Settings
    keys: Keys
    _core: ToolQueue
    _admin_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _client(self, url: str) -> aredis.Redis:  # pragma: no cover - provided by AsyncToolQueue
        raise NotImplementedError

    def _state_client(self) -> aredis.Redis:
        client: aredis.Redis | None = getattr(self, "_fleet_client", None)
        if client is None:
            client = self._client(self.settings.redis_url)
            self._fleet_client = client
        return client

    async def _run(self, plan: Plan[T]) -> T:
        try:
            return await run_plan_async(self._state_client(), plan)
        except (redis.RedisError, OSError) as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("state", self.settings.redis_url, exc) from None

    async def servers(self) -> list[dict[str, Any]]:
        """Every server the fleet knows (as :meth:`ToolQueue.servers`)."""
        return await self._run(fleet_state.servers_plan(self.keys))

    async def tools(self, server: str | None = None) -> list[dict[str, Any]]:
        """Every tool of every server, or of ``server`` (as :meth:`ToolQueue.tools`)."""
        return await self._run(fleet_state.tools_plan(self.keys, server))

    async def tools_version(self) -> int:
        """The fleet's tool-map version (changes whenever a worker publishes its tools)."""
        return await self._run(fleet_state.tools_version_plan(self.keys))

    async def breakers(self) -> dict[str, dict[str, Any]]:
        """Every known server's fleet-wide breaker (as :meth:`ToolQueue.breakers`)."""
        return await self._run(fleet_state.breakers_plan(self.keys))

    async def known_server(self, server: str) -> None:
        """Raise ServerNotFoundError unless a worker published ``server``."""
        await self._run(fleet_state.known_server_plan(self.keys, server))

    async def reset_breaker(self, server: str) -> bool:
        """Close ``server``'s breaker for the whole fleet; True if there was state to clear."""
        return await self._run(fleet_state.reset_plan(self.keys, server))

    async def reconnect(self, server: str) -> dict[str, Any]:
        """Make every worker process reopen its sessions to ``server`` (within about a second)."""
        return await self._run(fleet_state.reconnect_plan(self.keys, server))

    async def call_state(self, task_id: str) -> tuple[str, ToolResult | None]:
        """Call ``task_id``'s Celery state as the result backend has it (``PENDING``
        for a queued call and for an unknown or expired id alike) and its ToolResult
        once final: one GET, no waiting. Raises InvalidArgumentsError for a malformed id."""
        task_id = checked_call_id(task_id)
        backend = self._core.app.backend
        client: aredis.Redis | None = getattr(self, "_backend_client", None)
        if client is None:
            client = self._client(self.settings.result_backend)
            self._backend_client = client
        try:
            raw = await client.get(backend.get_key_for_task(task_id))
        except (redis.RedisError, OSError) as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("backend", self.settings.result_backend, exc) from None
        if raw is None:
            return states.PENDING, None
        meta = dict(backend.decode_result(raw))
        return str(meta.get("status", states.PENDING)), final_result(task_id, meta)

    def _admin_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        # Its own pool: the loop's default executor has only cpu + 4 threads,
        # which a handful of parked health requests would fill.
        pool = self._admin_pool
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="mcpq-admin")
            self._admin_pool = pool
        return pool

    def _close_admin_threads(self) -> None:
        """Stop the admin threads (waits left running end at their own ``wait``)."""
        pool = self._admin_pool
        if pool is not None:
            self._admin_pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    async def _admin(
        self, fn: Callable[[str | None, float], dict[str, Any]], server: str | None, wait: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin_threads(), fn, server, wait)

    async def health(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        """A worker pings every enabled server, or ``server`` (as :meth:`ToolQueue.health`)."""
        return await self._admin(self._core.health, server, wait)

    async def discover(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        """A worker re-lists the tools of every server, or ``server`` (as :meth:`ToolQueue.discover`)."""
        return await self._admin(self._core.discover, server, wait)
