"""Baseline tasks for the throughput benchmark (``python -m bench.throughput``).

A worker started with ``python -m celery -A bench.baselines worker ...`` serves
mcpq's own tasks (``mcpq.call_tool`` and friends, through the app's ``include``),
``bench.noop`` and the other tasks of ``bench.app``, and the two baselines below,
so every path of the benchmark shares broker, backend, pool and Celery settings.

- ``bench.bare_call(kind, tool, arguments)``: the **bare pipeline**, what a user
  would write by hand: one module-level ``mcp.Client`` per server, opened lazily
  on first use and kept open on a module-level asyncio loop thread; the task
  hands ``client.call_tool(...)`` to that loop and waits. No breaker, routing,
  validation, claims or retries. The result is dumped as mcpq dumps it
  (``model_dump(mode="json", by_alias=True, exclude_none=True)``).
- ``bench.cpc_call(kind, tool, arguments)``: the **connect-per-call pipeline**:
  ``asyncio.run`` of open client, call, close, per task (what several MCP
  adapters do today). Over stdio that starts a server process per call.

``kind`` names the server: ``stdio`` starts ``python -m mcpq.worker.demo_server stdio``
(without mcpq's ``mcpq.worker.launch`` wrapper), ``http`` connects to the Streamable
HTTP URL in ``BENCH_HTTP_URL`` (set by the benchmark for its worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from typing import Any

from celery import signals

from bench.app import noop  # registers bench.noop (and bench.app's other tasks) on mcpq's app
from bench.environment import stdio_params
from mcpq.worker.celery import app

__all__ = ["app", "bare_call", "cpc_call", "noop"]

HTTP_URL_ENV = "BENCH_HTTP_URL"
CALL_TIMEOUT = 60.0
CONNECT_TIMEOUT = 60.0


def server_target(kind: str) -> Any:
    """What ``mcp.Client(...)`` takes for the server ``kind`` (``stdio`` or ``http``)."""
    if kind == "stdio":
        return stdio_params()
    if kind == "http":
        url = os.environ.get(HTTP_URL_ENV)
        if not url:
            raise RuntimeError(f"{HTTP_URL_ENV} is not set: no Streamable HTTP server to call")
        return url
    raise ValueError(f"unknown server kind {kind!r} (stdio or http)")


def dump(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out


# -- the bare pipeline: module-level loop thread and one session per server ---------------


class _Session:
    """One ``mcp.Client`` kept open by an owner task on the module's loop
    (anyio wants the task that entered the client to exit it)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.client: Any = None
        self.closing: asyncio.Event | None = None
        self.owner: concurrent.futures.Future[None] | None = None

    async def own(self, ready: concurrent.futures.Future[None]) -> None:
        from mcp import Client

        self.closing = asyncio.Event()
        try:
            async with Client(server_target(self.kind)) as client:
                self.client = client
                ready.set_result(None)
                await self.closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            raise
        finally:
            self.client = None


_lock = threading.Lock()
_pid: int | None = None
_loop: asyncio.AbstractEventLoop | None = None
_sessions: dict[str, _Session] = {}


def _ensure_loop() -> asyncio.AbstractEventLoop:
    """The module's loop thread, started on first use (after a fork: anew)."""
    global _pid, _loop
    if _loop is None or _pid != os.getpid():
        _sessions.clear()  # a forked child inherits no usable session
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="bench-bare-loop", daemon=True).start()
        _pid = os.getpid()
    return _loop


def _client(kind: str) -> tuple[Any, asyncio.AbstractEventLoop]:
    session = _sessions.get(kind)
    loop = _loop
    if session is not None and session.client is not None and loop is not None and _pid == os.getpid():
        return session.client, loop
    with _lock:
        loop = _ensure_loop()
        session = _sessions.get(kind)
        if session is None or session.client is None:
            session = _Session(kind)
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            session.owner = asyncio.run_coroutine_threadsafe(session.own(ready), loop)
            ready.result(CONNECT_TIMEOUT)
            _sessions[kind] = session
        return session.client, loop


@app.task(name="bench.bare_call")
def bare_call(kind: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    client, loop = _client(kind)
    fut = asyncio.run_coroutine_threadsafe(client.call_tool(tool, arguments), loop)
    return dump(fut.result(CALL_TIMEOUT))


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_sessions(**_: Any) -> None:
    """Close the bare sessions (so their stdio servers exit) and stop the loop."""
    global _loop
    with _lock:
        loop = _loop
        if loop is None or _pid != os.getpid():
            return
        for session in list(_sessions.values()):
            if session.closing is not None:
                loop.call_soon_threadsafe(session.closing.set)
        for session in list(_sessions.values()):
            if session.owner is not None:
                with contextlib.suppress(Exception):
                    session.owner.result(10)
        _sessions.clear()
        loop.call_soon_threadsafe(loop.stop)
        _loop = None


# -- the connect-per-call pipeline -------------------------------------------------------


@app.task(name="bench.cpc_call")
def cpc_call(kind: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    async def once() -> dict[str, Any]:
        from mcp import Client

        async with Client(server_target(kind)) as client:
            result = await client.call_tool(tool, arguments)
        return dump(result)

    return asyncio.run(asyncio.wait_for(once(), CALL_TIMEOUT))
