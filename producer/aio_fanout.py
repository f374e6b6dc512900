"""Fan-out on the asyncio face: ``AsyncToolQueue.map / fan_out / as_completed``.

The same batch as the sync engine (:mod:`mcpq.producer.engine`): the same
options (:class:`FanOutConfig`), shape (:func:`batch_shape`: window, chunk
size, rounds), per-call failures (:func:`invalid_call_result`), stall rule
(:func:`stalled_result`) and progress accounting; calls are prepared by
:mod:`mcpq.producer.submission` and sent by the publisher thread with
:mod:`mcpq.producer.sending`. What differs is only how the batch waits:
each call's state (:mod:`mcpq.producer.aio_tracker`) resolves on the
queue's one listener connection, and the batch awaits the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sized
from typing import Any, Protocol, Unpack

from celery import states

from mcpq.producer.aio_publisher import PublisherThread
from mcpq.producer.aio_tracker import CallState, CallTracker
from mcpq.producer.calls import Call, Progress, coerce_call, invalid_call_result
from mcpq.producer.engine import batch_shape, stalled_result
from mcpq.producer.fanout_options import FanOutConfig, FanOutOptions
from mcpq.producer.publish_policy import RESULT_GRACE
from mcpq.producer.submission import PreparedCall, prepare_call
from mcpq.worker.contract.errors import InvalidArgumentsError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings


class AsyncToolQueue(Protocol):
    """What a batch needs of the queue it runs on (an :class:`~mcpq.producer.aio.AsyncToolQueue`);
    a protocol, so that this module does not import the queue that imports it."""

    @property
    def settings(self) -> Settings: ...

    def _started(self) -> tuple[PublisherThread, CallTracker]: ...

    async def _track(self, task_id: str, label: str, *, progress: bool, look: bool) -> CallState: ...

    def _release(self, state: CallState) -> None: ...


#: A call's last status -> the Celery state the stall message names.
_CELERY_STATE = {"queued": states.PENDING, "started": states.STARTED, "retrying": states.RETRY}


class AsyncBatchRun:
    """One batch on the asyncio face: publishes rounds while the window has
    room and yields ``(index, ToolResult)`` as calls finish."""

    def __init__(
        self, aq: AsyncToolQueue, calls: Iterable[Call | Mapping[str, Any]], config: FanOutConfig
    ) -> None:
        """Raises ValueError for a ``chunk_size`` or ``window`` out of range."""
        self.aq = aq
        self.config = config
        self.total: int | None = len(calls) if isinstance(calls, Sized) else None
        self.window, self.chunk_size, self.publish_batch = batch_shape(config, self.total)
        self.queue_name = config.queue or aq.settings.queue
        self._input = enumerate(calls)
        self.exhausted = False
        self._outstanding: dict[str, tuple[int, CallState]] = {}
        self._finished: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self._ready: list[tuple[int, ToolResult]] = []
        self._longest_call = 0.0
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_activity = self.started

    def progress(self) -> Progress:
        return Progress(
            done=self.done,
            failed=self.failed,
            total=self.total,
            submitted=self.submitted,
            elapsed=time.monotonic() - self.started,
        )

    async def drain(self) -> AsyncGenerator[tuple[int, ToolResult], None]:
        """Every call's ``(index, ToolResult)`` as it finishes, until all are done."""
        try:
            while True:
                await self._refill()
                out, self._ready = self._ready, []
                if not out and self._outstanding:
                    out = await self._next()
                if not out and self.exhausted and not self._outstanding:
                    return
                for index, result in out:
                    self.done += 1
                    if not result.success:
                        self.failed += 1
                    if self.config.on_progress is not None:
                        self.config.on_progress(self.progress())
                    yield index, result
        finally:
            self.close()

    async def _next(self) -> list[tuple[int, ToolResult]]:
        """Wait for calls to finish (at least one, or a stall)."""
        try:
            index, task_id = await asyncio.wait_for(self._finished.get(), max(self._until_stall(), 0.0))
        except TimeoutError:
            return self._give_up()
        out = [self._take(index, task_id)]
        while not self._finished.empty():
            out.append(self._take(*self._finished.get_nowait()))
        self._last_activity = time.monotonic()
        return out

    def _take(self, index: int, task_id: str) -> tuple[int, ToolResult]:
        _, state = self._outstanding.pop(task_id)
        self.aq._release(state)
        # An unreachable result backend ends the batch, as on the sync face.
        return index, state.done.result()

    # -- publishing ---------------------------------------------------------------
    async def _refill(self) -> None:
        while not self.exhausted:
            room = self.publish_batch if self.window is None else self.window - len(self._outstanding)
            size = min(self.publish_batch, room // self.chunk_size * self.chunk_size)
            if size <= 0:
                return
            batch: list[tuple[int, PreparedCall]] = []
            while len(batch) < size:
                try:
                    index, item = next(self._input)
                except StopIteration:
                    self.exhausted = True
                    self.total = self.submitted + len(batch)
                    break
                try:
                    batch.append((index, self._prepare(coerce_call(item))))
                except InvalidArgumentsError as exc:
                    self.submitted += 1
                    self._ready.append((index, invalid_call_result(item, index, exc)))
            if batch:
                await self._publish(batch)

    def _prepare(self, call: Call) -> PreparedCall:
        self._longest_call = max(self._longest_call, call.timeout or self.aq.settings.default_timeout)
        return prepare_call(
            self.aq.settings,
            call.tool,
            call.arguments,
            server=call.server,
            timeout=call.timeout,
            queue=self.queue_name,
            progress=self.config.on_call_progress is not None,
        )

    async def _publish(self, batch: list[tuple[int, PreparedCall]]) -> None:
        publisher, _ = self.aq._started()
        wants_progress = self.config.on_call_progress is not None
        # Listen before publishing, so no result can come before its listener.
        tracked = await asyncio.gather(
            *(self.aq._track(c.task_id, c.label, progress=wants_progress, look=False) for _, c in batch),
            return_exceptions=True,
        )
        failure = next((t for t in tracked if isinstance(t, BaseException)), None)
        for (index, call), state in zip(batch, tracked, strict=True):
            if isinstance(state, BaseException):
                continue
            self._follow(index, call.task_id, state)
        if failure is not None:
            raise failure
        await publisher.publish_many([c for _, c in batch], self.chunk_size)
        self.submitted += len(batch)
        self._last_activity = time.monotonic()

    def _follow(self, index: int, task_id: str, state: CallState) -> None:
        self._outstanding[task_id] = (index, state)
        state.done.add_done_callback(lambda _: self._finished.put_nowait((index, task_id)))
        callback = self.config.on_call_progress
        if callback is not None:
            state.progress_watchers.append(lambda update: callback(index, update))

    # -- stalls -------------------------------------------------------------------
    def _stall_timeout(self) -> float:
        if self.config.stall_timeout is not None:
            return self.config.stall_timeout
        return (self._longest_call or self.aq.settings.default_timeout) + RESULT_GRACE

    def _until_stall(self) -> float:
        return self._last_activity + self._stall_timeout() - time.monotonic()

    def _give_up(self) -> list[tuple[int, ToolResult]]:
        stall = self._stall_timeout()
        out = []
        for task_id, (index, state) in list(self._outstanding.items()):
            if state.done.done():
                continue  # its result is queued: taken next round
            self._outstanding.pop(task_id)
            celery_state = {"queued": states.PENDING, "started": states.STARTED}.get(
                state.status, state.status
            )
            out.append((index, stalled_result(state.label, task_id, celery_state, stall, self.queue_name)))
            self.aq._release(state)
        self._last_activity = time.monotonic()
        return out

    def close(self) -> None:
        """Stop following the batch's calls (they go on)."""
        for _, state in self._outstanding.values():
            self.aq._release(state)
        self._outstanding.clear()


def as_completed(
    aq: AsyncToolQueue, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
) -> AsyncIterator[tuple[int, ToolResult]]:
    """``async for (index, result)`` as ``calls`` finish (every index once).
    Options as for the sync :func:`~mcpq.producer.fanout.as_completed`; a
    misspelt option or a bad window or chunk size fails here, at the call."""
    return AsyncBatchRun(aq, calls, FanOutConfig.from_options(options)).drain()


async def fan_out(
    aq: AsyncToolQueue, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
) -> list[ToolResult]:
    """Run ``calls``; one ToolResult per call, in input order."""
    results: dict[int, ToolResult] = {}
    async for index, result in as_completed(aq, calls, **options):
        results[index] = result
    return [results[i] for i in range(len(results))]


async def map_calls(
    aq: AsyncToolQueue,
    tool: str,
    arguments: Iterable[Mapping[str, Any]],
    *,
    server: str | None = None,
    timeout: float | None = None,
    **options: Unpack[FanOutOptions],
) -> list[ToolResult]:
    """``tool`` once per arguments mapping; results in the same order (as the sync ``map_calls``)."""
    calls = (
        Call(tool, dict(a), server, timeout)
        if isinstance(a, Mapping)
        else {"tool": tool, "arguments": a, "server": server, "timeout": timeout}
        for a in arguments
    )
    sized: Iterable[Call | Mapping[str, Any]] = list(calls) if isinstance(arguments, Sized) else calls
    return await fan_out(aq, sized, **options)
