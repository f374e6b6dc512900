"""Per-process pool of open MCP sessions, one asyncio loop for all of them.

Shape (NOTES-mcp-sdk.md explains each choice):

* A ``Session`` is one ``mcp.Client`` kept open by an *owner task* that enters
  it and stays parked until asked to close: anyio requires the task that
  entered a Client to exit it. Calls from any number of other tasks on the
  loop are multiplexed over it by JSON-RPC id.
* A ``ServerSlots`` holds up to ``max_sessions`` sessions for one server,
  opens them lazily, replaces broken ones, and backs off after failed connects.
* The ``ConnectionPool`` maps server names to slots and remembers which
  protocol mode each server negotiated, so ``auto``'s discover probe (up to
  10 s against a handshake-era server) is paid once, not per connect.

Everything here runs on the loop thread; callers in task threads go through
:meth:`ConnectionPool.run`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp import Client

from mcpq.worker.classify import Outcome, SessionClosedBeforeSend, classify
from mcpq.worker.config import MCPServerConfig
from mcpq.worker.contract.errors import MCPConnectionError, MCPError, MCPTimeoutError, ServerNotFoundError
from mcpq.worker.elicitation import elicitation_callback, sampling_callback
from mcpq.worker.loop import LoopThread
from mcpq.worker.transports import client_target

log = logging.getLogger(__name__)

T = TypeVar("T")

#: After a failed connect, further connects to that server wait this long
#: (doubling per failure) so a dead server is not hammered by every call.
RECONNECT_BACKOFF_BASE = 0.25
RECONNECT_BACKOFF_MAX = 10.0

CLIENT_INFO = types.Implementation(name="mcpq", version="0.1.0")


@dataclass(slots=True)
class ProtocolChoice:
    """How to connect to a server next time: a Client ``mode`` and, for modern
    servers, the discover result to adopt without probing."""

    mode: str
    discover: dict[str, Any] | None = None


@dataclass(slots=True)
class ServerHandshake:
    """What a connect learned about the server, for discovery and health."""

    protocol_version: str
    server_info: dict[str, Any] | None
    capabilities: dict[str, Any]
    instructions: str | None


OnToolsChanged = Callable[[str], None]
OnConnected = Callable[[str, ServerHandshake, ProtocolChoice], None]


class Session:
    """One open MCP client session, owned by a parked task."""

    def __init__(
        self, config: MCPServerConfig, choice: ProtocolChoice, on_tools_changed: OnToolsChanged
    ) -> None:
        self.config = config
        self.choice = choice
        self.client: Client | None = None
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.broken = False
        self._on_tools_changed = on_tools_changed
        self._closing = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None

    async def open(self, timeout: float) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owner = asyncio.create_task(self._own(ready, timeout), name=f"mcpq-session-{self.config.name}")
        await ready

    async def _own(self, ready: asyncio.Future[None], timeout: float) -> None:
        try:
            # Inside the try: a target that cannot be built (a stdio command
            # that does not exist) must fail the waiting connect at once.
            client = Client(
                client_target(self.config),
                mode=self.choice.mode,
                prior_discover=(
                    types.DiscoverResult.model_validate(self.choice.discover)
                    if self.choice.discover
                    else None
                ),
                client_info=CLIENT_INFO,
                message_handler=self._on_message,
                # A server's own requests while a call holds the session: docs/interactive.md.
                elicitation_callback=elicitation_callback(self.config),
                sampling_callback=sampling_callback(self.config),
                cache=None,
            )
            # The SDK has no connect timeout; a deadline on an enclosing scope
            # (lifted once connected) bounds the handshake without breaking
            # anyio's rule that scopes close in the task that opened them.
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + timeout
                async with client:
                    scope.deadline = math.inf
                    self.client = client
                    ready.set_result(None)
                    await self._closing.wait()
            if scope.cancelled_caught and not ready.done():
                raise MCPTimeoutError(
                    f"server {self.config.name!r}: connecting did not finish within {timeout:g}s",
                    details={"server": self.config.name, "phase": "connect"},
                )
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else MCPConnectionError(str(exc)))
            elif not isinstance(exc, asyncio.CancelledError):
                log.info(
                    "session to %r ended: %s", self.config.name, classify(exc, self.config.name, "call").error
                )
        finally:
            self.broken = True
            self.client = None
            if not ready.done():
                ready.set_exception(
                    MCPConnectionError(f"server {self.config.name!r}: session closed during connect")
                )

    async def _on_message(self, message: Any) -> None:
        # Handshake-era servers announce tool changes spontaneously; modern
        # ones only on a listen stream, which the discovery TTL stands in for.
        if isinstance(message, types.ToolListChangedNotification):
            self._on_tools_changed(self.config.name)

    @property
    def usable(self) -> bool:
        if self.broken or self.client is None:
            return False
        # A stdio server that exited, or an HTTP client torn down by one
        # network error, leaves the dispatcher closed while the Client's
        # ``async with`` is still open (NOTES-mcp-sdk.md #4, #6).
        dispatcher = getattr(self.client.session, "_dispatcher", None)
        return not getattr(dispatcher, "_closed", False)

    def handshake(self) -> ServerHandshake:
        assert self.client is not None
        info = self.client.server_info
        return ServerHandshake(
            protocol_version=self.client.protocol_version,
            server_info=info.model_dump(mode="json", exclude_none=True) if info else None,
            capabilities=self.client.server_capabilities.model_dump(mode="json", exclude_none=True),
            instructions=self.client.instructions,
        )

    def learned_choice(self) -> ProtocolChoice:
        """The mode to use next time, now that this session negotiated one."""
        assert self.client is not None
        session = self.client.session
        discover = getattr(session, "discover_result", None)
        if discover is not None:
            return ProtocolChoice(
                self.client.protocol_version, discover.model_dump(mode="json", by_alias=True)
            )
        return ProtocolChoice("legacy")

    async def close_when_idle(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        self.broken = True
        self._closing.set()
        if self._owner is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._owner), timeout=15)


class ServerSlots:
    """Sessions to one server: lazy connect, least-loaded pick, backoff on failure."""

    def __init__(self, pool: ConnectionPool, config: MCPServerConfig) -> None:
        self.pool = pool
        self.config = config
        self.sessions: list[Session] = []
        self._connect_lock = asyncio.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: MCPError | None = None

    def _healthy(self) -> list[Session]:
        alive = [s for s in self.sessions if s.usable]
        for dead in [s for s in self.sessions if not s.usable]:
            self.sessions.remove(dead)
            self.pool.spawn(dead.close())
        return alive

    async def acquire(self, deadline: float) -> Session:
        alive = self._healthy()
        idle = [s for s in alive if s.in_flight == 0]
        if idle or (alive and len(alive) >= self.config.max_sessions):
            return min(idle or alive, key=lambda s: s.in_flight)
        async with self._connect_lock:
            alive = self._healthy()
            if alive and (len(alive) >= self.config.max_sessions or any(s.in_flight == 0 for s in alive)):
                return min(alive, key=lambda s: s.in_flight)
            try:
                session = await self._connect(deadline)
            except MCPError:
                if alive:  # a spare session could not be added; share an existing one
                    return min(alive, key=lambda s: s.in_flight)
                raise
            self.sessions.append(session)
            return session

    async def _connect(self, deadline: float) -> Session:
        now = time.monotonic()
        if now < self._retry_at and self._last_error is not None:
            raise type(self._last_error)(
                f"{self._last_error.message} (next reconnect attempt in {self._retry_at - now:.2f}s)",
                details={**self._last_error.details, "retry_in": round(self._retry_at - now, 3)},
            )
        timeout = min(self.config.connect_timeout, max(deadline - now, 0.001))
        choice = self.pool.protocol_choice(self.config)
        session = Session(self.config, choice, self.pool.tools_changed)
        try:
            await session.open(timeout)
        except asyncio.CancelledError:
            # The waiting call was cancelled (a caller's cancel, or its task
            # gave up): not the server's fault, so no backoff; the half-open
            # session must not linger unowned.
            self.pool.spawn(session.close())
            raise
        except BaseException as exc:
            outcome = classify(exc, self.config.name, "connect", timeout)
            if choice.mode != self.config.protocol and not isinstance(exc, asyncio.CancelledError):
                # A remembered mode may be stale (the server was upgraded or
                # downgraded): forget it so the next connect negotiates afresh.
                self.pool.forget_protocol(self.config.name)
            self._failures += 1
            delay = min(RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_BASE * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            self._last_error = outcome.error
            outcome.error.details.setdefault("server", self.config.name)
            outcome.error.details.setdefault("phase", "connect")
            raise outcome.error from None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = None
        self.pool.connected(self.config, session)
        return session

    async def close(self) -> None:
        sessions, self.sessions = self.sessions, []
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def retire_all(self) -> None:
        sessions, self.sessions = self.sessions, []
        self._failures, self._retry_at, self._last_error = 0, 0.0, None
        for session in sessions:
            session.broken = True  # no new calls; in-flight ones keep their session
            self.pool.spawn(session.close_when_idle(self.config.timeout + self.config.connect_timeout))

    async def close_idle(self, idle_for: float) -> None:
        cutoff = time.monotonic() - idle_for
        for s in [s for s in self.sessions if s.in_flight == 0 and s.last_used < cutoff]:
            self.sessions.remove(s)
            await s.close()


class ConnectionPool:
    """All MCP sessions of this process. Create with :func:`get_pool`."""

    def __init__(
        self,
        configs: dict[str, MCPServerConfig],
        *,
        on_connected: OnConnected | None = None,
        on_tools_changed: OnToolsChanged | None = None,
        protocol_memory: dict[str, ProtocolChoice] | None = None,
    ) -> None:
        self.pid = os.getpid()
        self.configs = dict(configs)
        self._loop = LoopThread()
        self._slots: dict[str, ServerSlots] = {}
        self._protocols: dict[str, ProtocolChoice] = dict(protocol_memory or {})
        self._on_connected = on_connected
        self._on_tools_changed = on_tools_changed
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False
        self._reaper = self._loop.submit(self._reap_idle())

    # -- entry points for task threads -----------------------------------------
    def run(
        self,
        coro: Coroutine[Any, Any, T],
        timeout: float | None = None,
        on_submit: Callable[[concurrent.futures.Future[T]], None] | None = None,
    ) -> T:
        """Run ``coro`` on the loop from a task thread (:meth:`LoopThread.run`)."""
        return self._loop.run(coro, timeout, on_submit)

    def loop_call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the loop thread (it may spawn tasks there)."""
        self._loop.loop.call_soon_threadsafe(fn, *args)

    # -- protocol memory -------------------------------------------------------
    def protocol_choice(self, config: MCPServerConfig) -> ProtocolChoice:
        if config.protocol != "auto":
            return ProtocolChoice(config.protocol)
        return self._protocols.get(config.name) or ProtocolChoice("auto")

    def forget_protocol(self, server: str) -> None:
        self._protocols.pop(server, None)

    def remembered_protocols(self) -> dict[str, ProtocolChoice]:
        return dict(self._protocols)

    def connected(self, config: MCPServerConfig, session: Session) -> None:
        choice = session.learned_choice()
        if config.protocol == "auto":
            self._protocols[config.name] = choice
        if self._on_connected is not None:
            try:
                self._on_connected(config.name, session.handshake(), choice)
            except Exception:  # an observer must not break the connect
                log.exception("on_connected hook failed for %r", config.name)

    def tools_changed(self, server: str) -> None:
        if self._on_tools_changed is not None:
            self._on_tools_changed(server)

    # -- sessions ----------------------------------------------------------------
    def _slots_for(self, server: str) -> ServerSlots:
        slots = self._slots.get(server)
        if slots is None:
            config = self.configs.get(server)
            if config is None:
                raise ServerNotFoundError(
                    f"no server named {server!r} is configured", details={"server": server}
                )
            slots = self._slots[server] = ServerSlots(self, config)
        return slots

    def spawn(self, coro: Awaitable[Any]) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def with_session(
        self, server: str, deadline: float, op: Callable[[Client], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run ``op`` on a session to ``server``, reconnecting once when the
        session turns out dead before the request reached the server (or at
        any point, when ``idempotent`` says a second execution is harmless).

        ``deadline`` is a ``time.monotonic()`` instant. Connect failures raise
        an :class:`MCPError`; call failures raise :class:`OutcomeError`.
        """
        slots = self._slots_for(server)
        for attempt in (1, 2):
            session = await slots.acquire(deadline)
            session.in_flight += 1
            session.last_used = time.monotonic()
            try:
                client = session.client
                if client is None or not session.usable:
                    raise SessionClosedBeforeSend()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MCPTimeoutError(f"server {server!r}: the call's deadline passed before it was sent")
                return await asyncio.wait_for(op(client), timeout=remaining + 0.5)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                outcome = classify(exc, server, "call", deadline - session.last_used)
                if outcome.session_broken:
                    session.broken = True
                if attempt == 1 and outcome.session_broken and not outcome.maybe_executed:
                    log.info("server %r: %s; reconnecting and sending again", server, outcome.error.message)
                    continue
                if idempotent and attempt == 1 and outcome.session_broken and outcome.maybe_executed:
                    # The caller said a second execution is harmless (e.g. tools/list).
                    continue
                raise _OutcomeError(outcome) from None
            finally:
                session.in_flight -= 1
                session.last_used = time.monotonic()
        raise AssertionError("unreachable")

    async def reconnect(self, server: str) -> None:
        """Retire every session to ``server``: new calls connect afresh, calls
        in flight finish on the old session, which closes once they have."""
        slots = self._slots_for(server)
        slots.retire_all()

    def open_sessions(self) -> dict[str, int]:
        return {name: len([s for s in slots.sessions if s.usable]) for name, slots in self._slots.items()}

    def update_configs(self, configs: dict[str, MCPServerConfig]) -> None:
        self.configs = dict(configs)

    async def _reap_idle(self) -> None:
        while not self._closed:
            await asyncio.sleep(5.0)
            for slots in list(self._slots.values()):
                try:
                    await slots.close_idle(slots.config.idle_timeout)
                except Exception:
                    log.exception("closing idle sessions of %r failed", slots.config.name)

    async def _close_all(self) -> None:
        self._closed = True
        await asyncio.gather(*(slots.close() for slots in self._slots.values()), return_exceptions=True)
        self._slots.clear()

    def close(self, timeout: float = 20.0) -> None:
        """Close every session (stdio servers are terminated) and stop the loop."""
        if self.pid != os.getpid() or not self._loop.alive:
            return
        self._reaper.cancel()
        try:
            self._loop.run(self._close_all(), timeout)
        except Exception:
            log.exception("closing MCP sessions did not finish cleanly")
        self._loop.stop()


class _OutcomeError(Exception):
    """Carries a classified outcome out of :meth:`ConnectionPool.with_session`."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error.message)
        self.outcome = outcome


OutcomeError = _OutcomeError
