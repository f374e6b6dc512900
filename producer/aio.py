"""AsyncToolQueue: the asyncio face of :class:`~mcpq.producer.queue.ToolQueue`.

    async with AsyncToolQueue.from_env() as q:
        result = await q.call("get-sum", {"a": 2, "b": 40})
        handle = await q.submit("long-job", {}, progress=True)
        async for event in handle.events():
            ...

One set of rules, two faces: validation, task kwargs, idempotency keys and
the failure results of ``call`` are :mod:`mcpq.producer.submission`'s;
publishing is :mod:`mcpq.producer.sending`'s, run on one publisher thread per
queue (:mod:`mcpq.producer.aio_publisher`); results, states and progress
arrive on one pub/sub connection (:mod:`mcpq.producer.aio_tracker`): no
thread and no connection per waiting call. Cancel follows
:mod:`mcpq.producer.cancelling`, as the sync face does.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Unpack

import redis
import redis.asyncio as aredis
from celery import Celery

from mcpq.producer import aio_fanout
from mcpq.producer.aio_fleet import AsyncFleetState
from mcpq.producer.aio_publisher import PublisherThread
from mcpq.producer.aio_tracker import CallState, CallTracker
from mcpq.producer.calls import Call
from mcpq.producer.cancelling import (
    NOT_FOUND_WAIT,
    CancelOutcome,
    cancel_step,
    checked_call_id,
    not_found,
    read_meta,
)
from mcpq.producer.events import CallEvent, ProgressEvent, ResultEvent, StatusEvent
from mcpq.producer.fanout_options import FanOutOptions
from mcpq.producer.queue import ToolQueue
from mcpq.producer.submission import (
    call_label,
    checked_seconds,
    not_enqueued_result,
    prepare_call,
    timed_out_result,
)
from mcpq.worker.contract.errors import MCPError, MCPTimeoutError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.tracing import submit_span
from mcpq.worker.contract.unreachable import is_unreachable, unreachable_error

#: Connections of each async client at most: the pub/sub one plus a few for GET/MGET.
CLIENT_CONNECTIONS = 4


def _closed_error() -> MCPError:
    return MCPError("the AsyncToolQueue is closed; make a new one (or use `async with`)")


class AsyncCallHandle:
    """A submitted call, followed on the queue's one listener connection."""

    def __init__(
        self,
        queue: AsyncToolQueue,
        task_id: str,
        tool: str,
        wait_hint: float | None = None,
        state: CallState | None = None,
        *,
        progress: bool = False,
    ) -> None:
        """Made by :meth:`AsyncToolQueue.submit` (with the call's ``state``) and
        :meth:`AsyncToolQueue.get` (without: followed from the first await)."""
        self._queue = queue
        self.id = task_id
        self.tool = tool
        self._wait_hint = wait_hint
        self._state = state
        self._wants_progress = progress
        self._finalizer: weakref.finalize[Any, Any] | None = None
        # A handle from submit names a call this queue published: no need to ask whether it exists.
        self._known = state is not None
        if state is not None:
            self._hold(state)

    def _hold(self, state: CallState) -> None:
        self._state = state
        # A handle dropped without close() must not keep its call followed forever.
        self._finalizer = weakref.finalize(self, self._queue._release_soon, state)

    @property
    def progress(self) -> ProgressUpdate | None:
        """The latest progress the call reported, or None (none yet, or not
        asked for with ``progress=True``)."""
        return None if self._state is None else self._state.progress

    @property
    def status(self) -> str:
        """``queued``, ``started``, ``retrying`` or ``finished``, as last heard."""
        return "queued" if self._state is None else self._state.status

    async def _followed(self) -> CallState:
        if self._state is None:
            state = await self._queue._track(self.id, self.tool, progress=self._wants_progress, look=True)
            if self._state is None:
                self._hold(state)
            else:  # another await of this handle got there first
                self._queue._release(state)
        assert self._state is not None
        return self._state

    async def result(self, timeout: float | None = None) -> ToolResult:
        """Wait for the ToolResult. Raises MCPTimeoutError if none came within
        ``timeout`` seconds (default: the call's deadline plus grace; None for
        a handle from ``get``: no limit); the call goes on, await again."""
        state = await self._followed()
        wait = timeout if timeout is not None else self._wait_hint
        try:
            return await asyncio.wait_for(asyncio.shield(state.done), wait)
        except TimeoutError:
            raise MCPTimeoutError(
                f"no result for {self.tool!r} within {wait:g}s (task {self.id} is {state.status}); "
                "is a worker running? start one with `mcpq worker`",
                details={"task_id": self.id, "state": state.status},
            ) from None

    async def cancel(self) -> CancelOutcome:
        """Cancel the call: see :meth:`AsyncToolQueue.cancel`."""
        return await self._queue.cancel(self.id)

    async def events(self) -> AsyncIterator[CallEvent]:
        """The call's events (:mod:`mcpq.producer.events`): a ``status`` first,
        then status changes and ``progress`` as they happen, the ``result``
        last; the iterator ends after it. Raises CallNotFoundError for an id
        no call has (a handle from ``get``)."""
        state = await self._followed()
        if not (self._known or state.stored) and state.result is None:
            await self._queue._must_be_known(state)
            self._known = True
        inbox: asyncio.Queue[CallEvent | BaseException] = asyncio.Queue()
        state.listeners.append(inbox)
        try:
            # The snapshot and the registration happen without an await between
            # them: nothing is missed, nothing comes twice.
            if state.result is not None:
                yield StatusEvent(state.status)
                yield ResultEvent(state.result)
                return
            yield StatusEvent(state.status)
            if state.progress is not None:
                yield ProgressEvent.of(state.progress)
            while True:
                event = await inbox.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, StatusEvent) and event.state == "finished":
                    continue  # the result event says so
                yield event
                if isinstance(event, ResultEvent):
                    return
        finally:
            with contextlib.suppress(ValueError):
                state.listeners.remove(inbox)

    def close(self) -> None:
        """Stop following the call (it goes on); the handle's waits end."""
        if self._finalizer is not None:
            self._finalizer()

    def __repr__(self) -> str:
        return f"<AsyncCallHandle {self.tool} id={self.id} status={self.status}>"


class AsyncToolQueue(AsyncFleetState):
    """Enqueue tool calls from asyncio code; the same rules and results as ToolQueue.
    The fleet's state (servers, tools, breakers, health) comes from :class:`AsyncFleetState`."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        """``settings`` (default: the environment) say where the broker, the
        result backend and the state Redis are; ``app`` is an existing Celery
        app to publish with. Nothing connects before the first call."""
        self.settings = settings or Settings.from_env()
        #: The sync face, used only on the publisher thread (it blocks).
        self._core = ToolQueue(self.settings, app=app)
        self.keys = Keys(self.settings.key_prefix)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: PublisherThread | None = None
        self._tracker: CallTracker | None = None
        self._clients: list[aredis.Redis] = []
        self._closed = False

    @classmethod
    def from_env(cls) -> AsyncToolQueue:
        return cls(Settings.from_env())

    async def __aenter__(self) -> AsyncToolQueue:
        self._started()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def app(self) -> Celery:
        return self._core.app

    def _client(self, url: str) -> aredis.Redis:
        pool = aredis.BlockingConnectionPool.from_url(
            url,
            max_connections=CLIENT_CONNECTIONS,
            timeout=self.settings.socket_timeout,
            socket_timeout=self.settings.socket_timeout,
            socket_connect_timeout=self.settings.connect_timeout,
        )
        client = aredis.Redis(connection_pool=pool)
        self._clients.append(client)
        return client

    def _started(self) -> tuple[PublisherThread, CallTracker]:
        """The publisher thread and the tracker, started on first use in the running loop."""
        if self._closed:
            raise _closed_error()
        loop = asyncio.get_running_loop()
        if self._publisher is None or self._tracker is None:
            self._loop = loop
            self._publisher = PublisherThread(self._core, loop)
            self._tracker = CallTracker(
                self._core.app.backend,
                self._client(self.settings.result_backend),
                self._client(self.settings.redis_url),
                self.keys,
                lambda exc: unreachable_error("backend", self.settings.result_backend, exc),
            )
        elif loop is not self._loop:
            raise MCPError("an AsyncToolQueue belongs to the event loop it was first used in")
        return self._publisher, self._tracker

    async def _track(self, task_id: str, label: str, *, progress: bool, look: bool) -> CallState:
        _, tracker = self._started()
        try:
            return await tracker.track(task_id, label, progress=progress, look=look)
        except (redis.RedisError, OSError) as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("backend", self.settings.result_backend, exc) from None

    def _release(self, state: CallState) -> None:
        if self._tracker is not None:
            self._tracker.release(state)

    def _release_soon(self, state: CallState) -> None:
        """A handle's finalizer: release on the loop, whichever thread collected it."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._release, state)

    async def _blocking(self, fn: Any, service: str, url: str) -> Any:
        """Run ``fn`` on the publisher thread; an unreachable ``service`` says so."""
        publisher, _ = self._started()
        try:
            return await publisher.run(fn)
        except (redis.RedisError, OSError) as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error(service, url, exc) from None

    # -- calls -------------------------------------------------------------------
    async def submit(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        queue: str | None = None,
        progress: bool = False,
    ) -> AsyncCallHandle:
        """Enqueue one call; return its handle once it is published.

        :param tool: the tool's name, or ``server/tool``.
        :param arguments: the tool's arguments.
        :param server: the server to call (else the tool's name routes it).
        :param timeout: the call's deadline on the worker, seconds.
        :param idempotency_key: the same key and call within the window get the first call's result.
        :param request_id: the task id to use (default: a new UUID).
        :param queue: the Celery queue, overriding MCPQ_QUEUE.
        :param progress: relay the server's progress (``handle.progress``, ``events()``).
        :raises InvalidArgumentsError: arguments or timeout that cannot be sent; a reused key.
        :raises MCPConnectionError: the broker, result backend or state Redis is unreachable.
        :raises MCPError: the queue is closed.
        """
        with submit_span(tool, server, queue or self.settings.queue):  # a no-op unless tracing is on
            prepared = prepare_call(
                self.settings,
                tool,
                arguments,
                server=server,
                timeout=timeout,
                request_id=request_id,
                idempotency_key=idempotency_key,
                queue=queue,
                progress=progress,
                traced=True,
            )
            publisher, tracker = self._started()
            # Listen before publishing, so no result can come before its listener.
            state = await self._track(prepared.task_id, prepared.label, progress=progress, look=False)
            try:
                # Published on the publisher thread, with this span's context (PreparedCall.trace).
                answered_by = await publisher.publish(prepared)
            except BaseException:
                tracker.release(state)
                raise
        if answered_by != prepared.task_id:
            # An idempotency key's earlier call: its result (maybe stored already) is this one's.
            tracker.release(state)
            state = await self._track(answered_by, prepared.label, progress=progress, look=True)
        # The handle takes over the hold of the track above.
        return AsyncCallHandle(
            self, answered_by, prepared.label, prepared.wait_hint, state, progress=progress
        )

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        queue: str | None = None,
        wait: float | None = None,
        progress: bool = False,
    ) -> ToolResult:
        """Submit and wait, with the failure rules of :meth:`ToolQueue.call`:
        always a ToolResult for a failure to enqueue (``connection_error``,
        ``invalid_arguments``) or no result within ``wait`` (``timeout``, the
        task in ``details.task_id``); losing the result backend while waiting
        raises MCPConnectionError, a closed queue MCPError.
        Parameters as for :meth:`submit`; ``wait`` defaults to the deadline plus grace."""
        label = call_label(tool, server)
        try:
            if wait is not None:
                wait = checked_seconds(wait, "wait", allow_zero=True)
            handle = await self.submit(
                tool,
                arguments,
                server=server,
                timeout=timeout,
                idempotency_key=idempotency_key,
                request_id=request_id,
                queue=queue,
                progress=progress,
            )
        except Exception as exc:
            if type(exc) is MCPError:  # a closed queue: a mistake to raise, not a result
                raise
            return not_enqueued_result(label, exc, request_id, self.settings.broker_url)
        try:
            return await handle.result(wait)
        except MCPTimeoutError as exc:
            return timed_out_result(label, exc, request_id, handle.id)
        finally:
            handle.close()

    def get(self, task_id: str, tool: str = "?", *, progress: bool = False) -> AsyncCallHandle:
        """A handle for a call submitted earlier (by id); it is followed from its
        first await. ``progress=True`` also follows the call's progress.
        Raises InvalidArgumentsError for an id that cannot name a call."""
        if self._closed:
            raise _closed_error()
        return AsyncCallHandle(self, checked_call_id(task_id), tool, progress=progress)

    async def _must_be_known(self, state: CallState) -> None:
        """Raise CallNotFoundError unless ``state``'s id is a call: due in the
        ledger, or a result arriving within NOT_FOUND_WAIT."""
        ledger = self._core.ledger
        if await self._blocking(lambda: ledger.knows(state.id), "state", self.settings.redis_url):
            return
        try:
            await asyncio.wait_for(asyncio.shield(state.done), NOT_FOUND_WAIT)
        except TimeoutError:
            raise not_found(state.id) from None

    # -- cancel ------------------------------------------------------------------
    async def _request_cancel(self, task_ids: Sequence[str]) -> None:
        """Flag calls a fan-out published itself as cancelled and tell the
        workers, in one request on the publisher thread (no checks: see
        :meth:`ToolQueue.request_cancel`). Raises MCPConnectionError when the
        state Redis cannot be reached."""
        ids, core = list(task_ids), self._core
        await self._blocking(lambda: core.request_cancel(ids), "state", self.settings.redis_url)

    async def cancel(self, task_id: str) -> CancelOutcome:
        """Cancel call ``task_id``, as :meth:`ToolQueue.cancel` does (same
        outcomes, same errors): ``CancelOutcome(id, "finished", result)`` for
        a call that had ended, ``CancelOutcome(id, "requested")`` once asked
        for (a queued call ends ``cancelled`` when a worker reaches its message).

        :raises InvalidArgumentsError: ``task_id`` cannot name a call.
        :raises CallNotFoundError: no call of that id is known.
        :raises MCPConnectionError: the state Redis or the result backend cannot be reached.
        """
        task_id = checked_call_id(task_id)
        # Subscribed before the reads: a result stored meanwhile is heard of.
        state = await self._track(task_id, "?", progress=False, look=False)
        try:
            core, backend = self._core, self._core.app.backend
            outcome = await self._blocking(
                lambda: cancel_step(
                    task_id,
                    lambda: read_meta(backend, task_id),
                    lambda: core.ledger.knows(task_id),
                    lambda: core.request_cancel([task_id]),
                ),
                "state",
                self.settings.redis_url,
            )
            if outcome is not None:
                return outcome  # type: ignore[no-any-return]
            if state.result is not None:
                return CancelOutcome(task_id, "finished", state.result)
            try:
                result = await asyncio.wait_for(asyncio.shield(state.done), NOT_FOUND_WAIT)
            except TimeoutError:
                raise not_found(task_id) from None
            return CancelOutcome(task_id, "finished", result)
        finally:
            self._release(state)

    # -- many calls (producer/aio_fanout.py) --------------------------------------------
    async def map(
        self,
        tool: str,
        arguments: Iterable[Mapping[str, Any]],
        *,
        server: str | None = None,
        timeout: float | None = None,
        **options: Unpack[FanOutOptions],
    ) -> list[ToolResult]:
        """``tool`` once per dict in ``arguments``; one ToolResult per call, in
        input order; options and results as for :meth:`ToolQueue.map`."""
        return await aio_fanout.map_calls(self, tool, arguments, server=server, timeout=timeout, **options)

    async def fan_out(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> list[ToolResult]:
        """Run ``calls``; one ToolResult per call, in input order (as :meth:`ToolQueue.fan_out`)."""
        return await aio_fanout.fan_out(self, calls, **options)

    def as_completed(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> AsyncIterator[tuple[int, ToolResult]]:
        """``async for (index, result)`` as ``calls`` finish, every index once
        (as :meth:`ToolQueue.as_completed`)."""
        return aio_fanout.as_completed(self, calls, **options)

    async def submit_many(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> aio_fanout.AsyncFanOutHandle:
        """Publish ``calls`` (as for :meth:`fan_out`) and return an
        ``AsyncFanOutHandle`` (``.ids``, ``.progress``, ``as_completed()``,
        ``await results()``, ``await cancel()``, ``close()``), as
        :meth:`ToolQueue.submit_many` does: ``options`` as for :meth:`map`,
        except that ``window`` defaults to 0 here: every call is published
        before this returns unless ``window`` is set (then the rest are
        published while the handle's results are read)."""
        return await aio_fanout.submit_many(self, calls, **options)

    # -- closing -----------------------------------------------------------------
    async def close(self) -> None:
        """Stop: waiters fail with MCPError, what is queued for publishing is
        published, connections close. Calls already published go on."""
        if self._closed:
            return
        self._closed = True
        publisher, tracker = self._publisher, self._tracker
        if tracker is not None:
            await tracker.close(_closed_error())
        if publisher is not None:
            await publisher.aclose()
        self._close_admin_threads()
        for client in self._clients:
            with contextlib.suppress(Exception):  # closing what may be unreachable
                await client.aclose()
        self._core.close()
