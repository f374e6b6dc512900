"""The asyncio face's one publisher thread: everything that blocks on the
network on the way out (ledger writes, idempotency SET NX, kombu publishing,
cancel requests) runs here, never on the event loop.

The thread drains everything queued since its last round and publishes it as
one round: several calls as ``mcpq.call_chunk`` tasks (chunked by
:func:`~mcpq.producer.calls.auto_chunk_size` of the round, each call keeping
its own id and result, its ledger members recorded), a call alone as one
``mcpq.call_tool`` (so a sequential ``await q.call`` costs what a sync call
does). The per-call rules are :mod:`mcpq.producer.submission`'s and the
sending is :mod:`mcpq.producer.sending`'s, exactly as the sync face uses them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mcpq.producer.calls import auto_chunk_size
from mcpq.producer.publish_policy import PUBLISH_RETRY
from mcpq.producer.queue import ToolQueue
from mcpq.producer.sending import plan_chunks, record_chunks, send_call_tool, send_chunks
from mcpq.producer.submission import PreparedCall, claim_idempotency_key
from mcpq.worker.contract.errors import MCPError
from mcpq.worker.contract.unreachable import is_unreachable, unreachable_error

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Outgoing:
    call: PreparedCall
    #: Resolves to the id the call is answered under: its own, or the first
    #: call's of its idempotency key.
    future: asyncio.Future[str]
    answer: str | BaseException | None = None


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    answer: Any = None
    error: BaseException | None = None


class PublisherThread:
    """One thread per AsyncToolQueue, publishing in rounds; see the module docstring."""

    def __init__(self, core: ToolQueue, loop: asyncio.AbstractEventLoop) -> None:
        """
        :param core: the sync queue whose app, ledger and Redis clients this thread (only) uses.
        :param loop: where the futures handed out are resolved.
        """
        self._core = core
        self._loop = loop
        self._calls: deque[_Outgoing] = deque()
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="mcpq-aio-publisher", daemon=True)
        self._thread.start()

    def publish(self, call: PreparedCall) -> asyncio.Future[str]:
        """Queue ``call`` for the next round; the future gives the id it is
        answered under, or the MCPError that says why it was not published."""
        future: asyncio.Future[str] = self._loop.create_future()
        with self._wake:
            self._check_running()
            self._calls.append(_Outgoing(call, future))
            self._wake.notify()
        return future

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run the blocking ``fn`` on the thread (after the current round)."""
        future: asyncio.Future[T] = self._loop.create_future()
        with self._wake:
            self._check_running()
            self._jobs.append(_Job(fn, future))
            self._wake.notify()
        return future

    def _check_running(self) -> None:
        if self._stopping:
            raise MCPError("the AsyncToolQueue is closed")

    def publish_many(self, calls: list[PreparedCall], chunk_size: int) -> asyncio.Future[None]:
        """Publish a fan-out's round as it is (``chunk_size`` calls per chunk
        task, 1: a ``mcpq.call_tool`` each), after the current round."""
        by_queue: dict[str, list[PreparedCall]] = defaultdict(list)
        for call in calls:
            by_queue[call.queue].append(call)

        def send() -> None:
            try:
                for queue, group in by_queue.items():
                    self._send(queue, group, chunk_size)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                raise unreachable_error("broker_or_backend", self._core.settings.broker_url, exc) from None

        return self.run(send)

    async def aclose(self) -> None:
        """Publish what is queued, then stop the thread; returns once it has."""
        with self._wake:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        await asyncio.shield(self._stopped)

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._calls and not self._jobs and not self._stopping:
                    self._wake.wait()
                calls = list(self._calls)
                jobs = list(self._jobs)
                self._calls.clear()
                self._jobs.clear()
                stopping = self._stopping
            if calls:
                self._round(calls)
            for job in jobs:
                try:
                    job.answer = job.fn()
                except BaseException as exc:  # handed to the awaiting task, not lost here
                    job.error = exc
            if calls or jobs:
                self._loop.call_soon_threadsafe(_resolve, calls, jobs)
            if stopping and not calls and not jobs:
                self._loop.call_soon_threadsafe(_finish, self._stopped)
                return

    def _round(self, items: list[_Outgoing]) -> None:
        """Publish one round; every item gets its answer (an id or an error)."""
        fresh: list[_Outgoing] = []
        for item in items:
            try:
                first = claim_idempotency_key(
                    self._core.redis, self._core.keys, self._core.settings, item.call
                )
            except MCPError as exc:
                item.answer = exc
                continue
            if first is not None:
                item.answer = first  # the key's first call answers this one; nothing is sent
            else:
                fresh.append(item)
        by_queue: dict[str, list[_Outgoing]] = defaultdict(list)
        for item in fresh:
            by_queue[item.call.queue].append(item)
        for queue, group in by_queue.items():
            try:
                self._send(queue, [o.call for o in group], auto_chunk_size(len(group)))
            except Exception as exc:
                error: BaseException = exc
                if is_unreachable(exc):
                    error = unreachable_error("broker_or_backend", self._core.settings.broker_url, exc)
                for item in group:
                    item.answer = error
                continue
            for item in group:
                item.answer = item.call.task_id

    def _send(self, queue: str, group: list[PreparedCall], chunk_size: int) -> None:
        """Publish ``group`` (all for ``queue``): chunk tasks of ``chunk_size``
        calls, single tasks for a chunk size of 1 and for calls a chunk entry
        cannot carry. Ledger first, then the broker."""
        app = self._core.app
        chunked = [c for c in group if c.chunkable] if chunk_size > 1 else []
        singles = [c for c in group if not (chunk_size > 1 and c.chunkable)]
        chunks = plan_chunks([(c.chunk_entry(), c.label) for c in chunked], chunk_size)
        if singles:
            self._core.record_in_ledger([c.ledger_entry for c in singles])
        if chunks:
            record_chunks(self._core.record_in_ledger, chunks, queue)
        with app.producer_or_acquire() as producer:
            for call in singles:
                send_call_tool(app, call, PUBLISH_RETRY, producer)
            if chunks:
                send_chunks(app, chunks, queue, PUBLISH_RETRY, producer)


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve(calls: list[_Outgoing], jobs: list[_Job]) -> None:
    """On the loop: hand every answer of one round to its waiting task."""
    for item in calls:
        if item.future.done():
            continue
        if isinstance(item.answer, BaseException):
            item.future.set_exception(item.answer)
        else:
            assert item.answer is not None
            item.future.set_result(item.answer)
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.answer)
