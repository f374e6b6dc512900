"""Fan-out on the asyncio face: ``AsyncToolQueue.map / fan_out / as_completed
/ submit_many``.

The same batch as the sync engine (:mod:`mcpq.producer.engine`): the same
options (:class:`FanOutConfig`), shape (:func:`batch_shape`: window, chunk
size, rounds), per-call failures (:func:`invalid_call_result`), stall rule
(:func:`stalled_result`), cancel rule (:func:`unsent_cancelled_result` for
calls never sent, a cancel request for the rest) and progress accounting;
calls are prepared by :mod:`mcpq.producer.submission` and sent by the
publisher thread with :mod:`mcpq.producer.sending`. What differs is only how
the batch waits: each call's state (:mod:`mcpq.producer.aio_tracker`)
resolves on the queue's one listener connection, and the batch awaits the
next one.

A batch is driven by :meth:`AsyncBatchRun.pump`, which a cancelled await
(``asyncio.timeout``) leaves intact: a publishing round goes on in its own
task and the next pump waits for it, results not handed out stay queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence, Sized
from typing import Any, Protocol, Unpack

from celery import states

from mcpq.producer.aio_publisher import PublisherThread
from mcpq.producer.aio_tracker import CallState, CallTracker
from mcpq.producer.calls import (
    Call,
    Progress,
    coerce_call,
    invalid_call_result,
    item_label,
    unsent_cancelled_result,
)
from mcpq.producer.engine import batch_shape, stalled_result
from mcpq.producer.fanout_options import SUBMIT_MANY_WINDOW, FanOutConfig, FanOutOptions
from mcpq.producer.publish_policy import RESULT_GRACE
from mcpq.producer.submission import PreparedCall, prepare_call
from mcpq.worker.contract.errors import InvalidArgumentsError, MCPError
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

    async def _request_cancel(self, task_ids: Sequence[str]) -> None: ...


#: A batch read in, not sent yet: ``(index, call, prepared call)`` per call.
_Staged = list[tuple[int, Call, PreparedCall]]


class AsyncBatchRun:
    """One batch on the asyncio face: publishes rounds while the window has
    room and hands out ``(index, ToolResult)`` as calls finish
    (:meth:`pump`, :meth:`drain`). Driven by one task at a time;
    :meth:`cancel` and :meth:`close` may come from any task of the loop."""

    def __init__(
        self,
        aq: AsyncToolQueue,
        calls: Iterable[Call | Mapping[str, Any]],
        config: FanOutConfig,
        *,
        task_ids: Sequence[str] | None = None,
    ) -> None:
        """A batch of ``calls`` published through ``aq`` as ``config`` says;
        nothing is published before the first :meth:`refill` or :meth:`pump`.
        ``task_ids`` gives every call its task id up front (one per call, in
        input order), else each gets a fresh one when published. Raises
        ValueError for a ``chunk_size`` or ``window`` out of range."""
        self.aq = aq
        self.config = config
        self.total: int | None = len(calls) if isinstance(calls, Sized) else None
        self.window, self.chunk_size, self.publish_batch = batch_shape(config, self.total)
        self.queue_name = config.queue or aq.settings.queue
        self._task_ids = task_ids
        self._input = enumerate(calls)
        self._read = 0
        self.exhausted = False
        self.cancelled = False
        self.closed = False
        self._outstanding: dict[str, tuple[int, CallState]] = {}
        #: Finished calls as ``(index, task id)``; None only wakes a waiting pump.
        self._finished: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self._ready: list[tuple[int, ToolResult]] = []
        #: The calls of the round being published, until they are followed.
        self._staged: _Staged = []
        #: The round being published (its own task: a cancelled pump does not cut it short).
        self._round: asyncio.Task[None] | None = None
        self._longest_call = 0.0
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_activity = self.started

    # -- state --------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(
            done=self.done,
            failed=self.failed,
            total=self.total,
            submitted=self.submitted,
            elapsed=time.monotonic() - self.started,
        )

    @property
    def finished(self) -> bool:
        """Every call read from the input and answered, and every answer handed out."""
        return (
            self.exhausted
            and not self._outstanding
            and not self._ready
            and not self._staged
            and self._round is None
        )

    @property
    def settled(self) -> bool:
        """Every call read from the input has its result, handed out or not
        (nothing is left to publish or to wait for)."""
        return (
            self.exhausted
            and not self._staged
            and (self._round is None or self._round.done())
            and all(state.done.done() for _, state in self._outstanding.values())
        )

    # -- driving ------------------------------------------------------------------
    async def pump(self) -> list[tuple[int, ToolResult]]:
        """Publish what fits, then return the calls that finished (waiting for
        at least one, or a stall). Empty only when all are done. Raises MCPError
        once the batch is closed, MCPConnectionError for a broker or result
        backend that cannot be reached."""
        while True:
            if self.closed:
                raise MCPError("the batch is closed: its calls go on, but nothing follows them here")
            await self._refill()
            out, self._ready = self._ready, []
            if not out and self._outstanding:
                out = await self._next()
            if out or self.finished:
                break
        for _, result in out:
            self.done += 1
            if not result.success:
                self.failed += 1
            if self.config.on_progress is not None:
                self.config.on_progress(self.progress())
        return out

    async def drain(self) -> AsyncGenerator[tuple[int, ToolResult], None]:
        """Every call's ``(index, ToolResult)`` as it finishes, until all are done."""
        try:
            while not self.finished:
                for item in await self.pump():
                    yield item
        finally:
            self.close()

    async def _next(self) -> list[tuple[int, ToolResult]]:
        """Wait for calls to finish (at least one, a stall, or a wake-up)."""
        try:
            first = await asyncio.wait_for(self._finished.get(), max(self._until_stall(), 0.0))
        except TimeoutError:
            return self._give_up()
        items = [first]
        while not self._finished.empty():
            items.append(self._finished.get_nowait())
        out = [self._take(*item) for item in items if item is not None and item[1] in self._outstanding]
        self._last_activity = time.monotonic()
        return out

    def _take(self, index: int, task_id: str) -> tuple[int, ToolResult]:
        _, state = self._outstanding.pop(task_id)
        self.aq._release(state)
        # An unreachable result backend ends the batch, as on the sync face.
        return index, state.done.result()

    def _wake(self) -> None:
        """Let a pump waiting for results look again (at ``_ready``, or ``closed``)."""
        self._finished.put_nowait(None)

    # -- cancel and close ---------------------------------------------------------
    async def cancel(self) -> int:
        """Cancel the batch, by the sync rule (:meth:`BatchRun.cancel`): publish
        nothing more, so every call not sent yet ends ``cancelled`` at once
        (``details.sent`` False; the rest of the input is read for them), and
        ask the workers, in one request, to cancel every published call not
        finished yet (each still ends with its own result, ``cancelled``
        unless it finished first). Results keep coming from :meth:`pump`.
        Returns how many calls were asked to cancel or ended unsent. Raises
        MCPConnectionError when the state Redis cannot be reached."""
        self.cancelled = True
        ids = [task_id for task_id, (_, state) in self._outstanding.items() if not state.done.done()]
        unsent = self._answer_unsent()
        if unsent:
            self._wake()
        if ids:
            await self.aq._request_cancel(ids)
        return len(ids) + unsent

    def _answer_unsent(self) -> int:
        """After a cancel: every call read but not sent, and every call not
        read yet, ends ``cancelled``, unsent. Returns how many did."""
        unsent: list[tuple[int, Any]] = [(index, call) for index, call, _ in self._staged]
        self._staged = []
        if not self.exhausted:
            for index, item in self._input:
                self._read += 1
                unsent.append((index, item))
            self.exhausted = True
            self.total = self._read
        for index, item in unsent:
            task_id = self._task_ids[index] if self._task_ids is not None else None
            self.submitted += 1
            self._ready.append((index, unsent_cancelled_result(item, index, task_id)))
        return len(unsent)

    def close(self) -> None:
        """Stop publishing and following the batch's calls (published ones go on)."""
        self.closed = True
        for _, state in self._outstanding.values():
            self.aq._release(state)
        self._outstanding.clear()
        self._wake()

    # -- publishing ---------------------------------------------------------------
    async def refill(self) -> None:
        """Publish as many rounds as the window has room for (all of the input
        with no window); calls that are not valid calls are answered at once."""
        await self._refill()

    async def _refill(self) -> None:
        if self._round is not None:
            # A round a cancelled pump left behind: it went on; wait for its end.
            await asyncio.shield(self._round)
            self._round = None
        while not self.exhausted and not self.cancelled and not self.closed:
            room = self.publish_batch if self.window is None else self.window - len(self._outstanding)
            # Whole tasks only: a round waits until the window has room for a full chunk.
            size = min(self.publish_batch, room // self.chunk_size * self.chunk_size)
            if size <= 0:
                return
            batch: _Staged = []
            while len(batch) < size:
                try:
                    index, item = next(self._input)
                except StopIteration:
                    self.exhausted = True
                    self.total = self._read
                    break
                self._read += 1
                try:
                    call = coerce_call(item)
                    batch.append((index, call, self._prepare(index, call)))
                except InvalidArgumentsError as exc:
                    self.submitted += 1
                    self._ready.append((index, invalid_call_result(item, index, exc)))
            if batch:
                self._staged = batch
                self._round = asyncio.get_running_loop().create_task(self._publish(batch))
                await asyncio.shield(self._round)
                self._round = None

    def _prepare(self, index: int, call: Call) -> PreparedCall:
        self._longest_call = max(self._longest_call, call.timeout or self.aq.settings.default_timeout)
        prepared = prepare_call(
            self.aq.settings,
            call.tool,
            call.arguments,
            server=call.server,
            timeout=call.timeout,
            queue=self.queue_name,
            progress=self.config.on_call_progress is not None,
        )
        if self._task_ids is None:
            return prepared
        # The id given up front; not a ``request_id`` kwarg, as on the sync face.
        return dataclasses.replace(prepared, task_id=self._task_ids[index])

    async def _publish(self, batch: _Staged) -> None:
        publisher, _ = self.aq._started()
        wants_progress = self.config.on_call_progress is not None
        # Listen before publishing, so no result can come before its listener.
        tracked = await asyncio.gather(
            *(self.aq._track(c.task_id, c.label, progress=wants_progress, look=False) for _, _, c in batch),
            return_exceptions=True,
        )
        if self.cancelled or self.closed:
            # cancel() answered these calls unsent meanwhile (or close() dropped them).
            for state in tracked:
                if not isinstance(state, BaseException):
                    self.aq._release(state)
            return
        self._staged = []
        failure = next((t for t in tracked if isinstance(t, BaseException)), None)
        for (index, _, call), state in zip(batch, tracked, strict=True):
            if isinstance(state, BaseException):
                continue
            self._follow(index, call.task_id, state)
        if failure is not None:
            raise failure
        # Counted before the await: a cancel meanwhile asks these calls to cancel.
        self.submitted += len(batch)
        await publisher.publish_many([c for _, _, c in batch], self.chunk_size)
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


class AsyncFanOutHandle:
    """A batch submitted without waiting (:meth:`AsyncToolQueue.submit_many`),
    as :class:`~mcpq.producer.fanout.FanOutHandle` is on the sync face.

    ``ids`` holds every call's task id in input order from the start. With
    ``window=0`` (the default here) every call is published before
    ``submit_many`` returns; with a window, the rest are published while
    ``as_completed()`` / ``results()`` run. Read it from one task at a time
    (``cancel()`` and ``close()`` from any); a wait cut short (say by
    ``asyncio.timeout``) loses nothing: await again to go on.
    """

    def __init__(self, run: AsyncBatchRun, ids: list[str], labels: list[str]) -> None:
        """Made by :func:`submit_many`: ``run`` is the batch, ``ids`` and
        ``labels`` its calls' task ids and labels in input order."""
        self._run = run
        self.ids = ids
        self.labels = labels
        self._results: list[ToolResult | None] = [None] * len(ids)
        #: Results taken from the batch and not yielded by ``as_completed`` yet.
        self._unseen: deque[tuple[int, ToolResult]] = deque()
        # A handle dropped without close() must not keep its calls followed forever.
        self._finalizer = weakref.finalize(self, _close_soon, run, asyncio.get_running_loop())

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def progress(self) -> Progress:
        """Where the batch stands, as of the results handed out so far."""
        return self._run.progress()

    def done(self) -> bool:
        """Whether every call has its result (``await results()`` would not wait)."""
        return self._run.settled

    async def as_completed(self) -> AsyncIterator[tuple[int, ToolResult]]:
        """``(index, ToolResult)`` for calls not yielded before, as they finish
        (every index once over all iterations). Raises MCPError after
        :meth:`close`, MCPConnectionError for an unreachable broker or result
        backend."""
        while True:
            while self._unseen:
                yield self._unseen.popleft()
            if self._run.finished:
                return
            for index, result in await self._run.pump():
                self._results[index] = result
                self._unseen.append((index, result))

    async def results(self) -> list[ToolResult]:
        """Wait for every call; one ToolResult per call, in input order (calls
        already yielded by ``as_completed`` included)."""
        async for _ in self.as_completed():
            pass
        return [r for r in self._results if r is not None]

    async def cancel(self) -> int:
        """Cancel the batch's calls not finished yet: published ones are asked
        to cancel (each still ends with its own result: ``cancelled``, unless it
        finished first), unpublished ones are never sent and end ``cancelled``
        at once (``details.sent`` is False). Keep reading ``results()`` /
        ``as_completed()`` for the outcomes. Returns how many calls the cancel
        reached (0 for a batch that has finished). Raises MCPConnectionError
        when the state Redis is unreachable."""
        return await self._run.cancel()

    def close(self) -> None:
        """Stop following the batch (the calls themselves go on; none is
        published any more); ``as_completed()`` and ``results()`` then raise
        MCPError, unless every result was in already."""
        self._finalizer.detach()
        self._run.close()

    def __repr__(self) -> str:
        p = self.progress
        return f"<AsyncFanOutHandle {p.done}/{self.total} done, {p.failed} failed>"


def _close_soon(run: AsyncBatchRun, loop: asyncio.AbstractEventLoop) -> None:
    """A dropped handle's finalizer: close its batch on the loop, whichever
    thread collected it (and not in the middle of whatever the loop was doing)."""
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(run.close)


def _label(item: Call | Mapping[str, Any]) -> str:
    """How a submitted call is named before it is checked (as the sync ``submit_many`` does)."""
    if isinstance(item, Call):
        return item.label
    tool = item.get("tool") if isinstance(item, Mapping) else None
    server = item.get("server") if isinstance(item, Mapping) else None
    return f"{server}/{tool}" if server else str(tool or "?")


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


async def submit_many(
    aq: AsyncToolQueue, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
) -> AsyncFanOutHandle:
    """Publish a batch and return an :class:`AsyncFanOutHandle`, as the sync
    :func:`~mcpq.producer.fanout.submit_many` does: ``calls`` is read to its
    end first (every call gets its task id up front); ``options`` are those of
    :class:`FanOutConfig` except that ``window`` defaults to
    :data:`SUBMIT_MANY_WINDOW` (0: every call is published before this
    returns). Raises MCPConnectionError for an unreachable broker or result
    backend (the calls published before it stay published)."""
    config = FanOutConfig.from_options(options, window=SUBMIT_MANY_WINDOW)
    items = list(calls)
    ids = [str(uuid.uuid4()) for _ in items]
    run = AsyncBatchRun(aq, items, config, task_ids=ids)
    try:
        await run.refill()
    except BaseException:
        run.close()
        raise
    return AsyncFanOutHandle(run, ids, [item_label(item) for item in items])
