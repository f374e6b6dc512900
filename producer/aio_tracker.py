"""Where the asyncio face follows its calls: one :class:`CallState` per call id,
fed by one pub/sub connection to the result backend (results, and the
STARTED / RETRY states Celery publishes on the same channel) and, for calls
that asked, the progress channels (the same connection when the state Redis
is the same server, else one more).

No thread and no connection per waiting call. A call is subscribed to before
it is published; calls whose result may already be stored (``get(id)``, an
idempotency key's earlier call, a reconnect) are read once with GET; a
safety-net MGET sweep reads the outstanding calls when nothing arrived for a
while (a lost message must not leave a caller waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis
from celery import states

from mcpq.producer.aio_listener import ChannelListener, same_server
from mcpq.producer.calls import task_result_to_tool_result
from mcpq.producer.events import (
    FINISHED,
    QUEUED,
    CallEvent,
    ProgressEvent,
    ResultEvent,
    StatusEvent,
    status_of,
)
from mcpq.worker.contract.errors import MCPError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult

log = logging.getLogger(__name__)

#: Sweep the outstanding calls when nothing arrived for this long...
IDLE_SWEEP_INTERVAL = 1.0
#: ...and, while results keep coming, sweep the calls outstanding this long at least this often.
MAX_SWEEP_INTERVAL = 15.0
#: Keys per MGET of a sweep.
SWEEP_SLICE = 1000


@dataclass(eq=False, slots=True)
class CallState:
    """One call as this queue knows it; shared by every handle of the id."""

    id: str
    label: str
    done: asyncio.Future[ToolResult]
    status: str = QUEUED
    progress: ProgressUpdate | None = None
    result: ToolResult | None = None
    wants_progress: bool = False
    #: Whether a look found an entry in the result backend (the id is a call).
    stored: bool = False
    #: Handles and operations using the state; at 0 an unfinished call stops being followed.
    holders: int = 0
    added_at: float = field(default_factory=time.monotonic)
    listeners: list[asyncio.Queue[CallEvent | BaseException]] = field(default_factory=list)
    #: Called with every new progress update (fan-out's ``on_call_progress``).
    progress_watchers: list[Callable[[ProgressUpdate], None]] = field(default_factory=list)

    def _emit(self, event: CallEvent | BaseException) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)

    def set_status(self, status: str) -> None:
        if status != self.status and self.result is None:
            self.status = status
            self._emit(StatusEvent(status))

    def set_progress(self, update: ProgressUpdate) -> None:
        if update != self.progress and self.result is None:
            self.progress = update
            self._emit(ProgressEvent.of(update))
            for watcher in self.progress_watchers:
                watcher(update)

    def finish(self, result: ToolResult) -> None:
        if self.result is not None or self.done.done():
            return
        self.result = result
        self.status = FINISHED
        self.done.set_result(result)
        self._emit(StatusEvent(FINISHED))
        self._emit(ResultEvent(result))

    def fail(self, error: BaseException) -> None:
        if self.done.done():
            return
        self.done.set_exception(error)
        self.done.exception()  # retrieved here: a state nobody awaits is no warning
        self._emit(error)


class CallTracker:
    """Every call an AsyncToolQueue follows; see the module docstring."""

    def __init__(
        self,
        backend: Any,
        results: aredis.Redis,
        state: aredis.Redis,
        keys: Keys,
        unreachable: Callable[[BaseException], MCPError],
    ) -> None:
        """
        :param backend: Celery's result backend (key names and decoding only; it never does I/O here).
        :param results: async client of the result backend (pub/sub, GET, MGET).
        :param state: async client of the state Redis (progress).
        :param keys: the state Redis key layout.
        :param unreachable: the error waiters get when the result backend is lost.
        """
        self._backend = backend
        self._results = results
        self._state = state
        self._keys = keys
        self._unreachable = unreachable
        self._calls: dict[str, CallState] = {}
        self._by_channel: dict[str, CallState] = {}
        self._result_listener = self._listener(results)
        self._progress_listener = (
            self._result_listener if same_server(results, state) else self._listener(state)
        )
        self._last_arrival = time.monotonic()
        self._last_sweep = time.monotonic()
        self._sweeping: asyncio.Task[None] | None = None
        self._closed: MCPError | None = None

    def _listener(self, client: aredis.Redis) -> ChannelListener:
        return ChannelListener(
            client,
            self._on_message,
            on_idle=self._on_idle,
            on_reconnect=self._on_reconnect,
            on_lost=self._on_lost,
        )

    def result_channel(self, task_id: str) -> str:
        key = self._backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    def __len__(self) -> int:
        return len(self._calls)

    # -- following calls -------------------------------------------------------------
    async def track(
        self, task_id: str, label: str, *, progress: bool = False, look: bool = False
    ) -> CallState:
        """Follow call ``task_id`` (subscribing before anything is published);
        the state is held once more (:meth:`release` when done with it).

        :param look: also read what is stored already (result, state, latest progress).
        :raises MCPError: the tracker is closed.
        :raises redis.RedisError: the result backend (or state Redis) cannot be reached.
        """
        if self._closed is not None:
            raise self._closed
        state = self._calls.get(task_id)
        new = state is None
        if state is None:
            state = CallState(task_id, label, asyncio.get_running_loop().create_future())
            self._calls[task_id] = state
            self._by_channel[self.result_channel(task_id)] = state
        elif state.label == "?" and label != "?":
            state.label = label
        state.holders += 1
        want_progress = progress and not state.wants_progress
        try:
            if new:
                await self._result_listener.subscribe([self.result_channel(task_id)])
            if want_progress:
                state.wants_progress = True
                self._by_channel[self._keys.progress(task_id)] = state
                await self._progress_listener.subscribe([self._keys.progress(task_id)])
            if look:
                state.stored = await self.look(state, progress=want_progress)
        except BaseException:
            self.release(state)
            raise
        return state

    async def look(self, state: CallState, *, progress: bool = False) -> bool:
        """Read what is stored for ``state`` now: its backend entry (and progress).
        True when the backend holds an entry for it (any state)."""
        raw = await self._results.get(self.result_channel(state.id))
        if raw is not None:
            self._apply_meta(state, raw)
        if progress and state.result is None:
            latest = await self._state.get(self._keys.progress(state.id))
            if latest is not None:
                update = ProgressUpdate.from_json(latest)
                if update is not None:
                    state.set_progress(update)
        return raw is not None

    def release(self, state: CallState) -> None:
        """One holder less; an unfinished call nobody holds stops being followed."""
        state.holders -= 1
        if state.holders <= 0 and self._calls.get(state.id) is state and self._closed is None:
            self._forget(state)

    def _forget(self, state: CallState) -> None:
        self._calls.pop(state.id, None)
        channel = self.result_channel(state.id)
        self._by_channel.pop(channel, None)
        with contextlib.suppress(RuntimeError):  # no running loop (interpreter shutdown)
            self._result_listener.unsubscribe([channel])
            if state.wants_progress:
                self._by_channel.pop(self._keys.progress(state.id), None)
                self._progress_listener.unsubscribe([self._keys.progress(state.id)])

    # -- what arrives ----------------------------------------------------------------
    def _on_message(self, channel: str, data: bytes) -> None:
        state = self._by_channel.get(channel)
        if state is None:
            return
        self._last_arrival = time.monotonic()
        if channel == self._keys.progress(state.id):
            update = ProgressUpdate.from_json(data)
            if update is not None:
                state.set_progress(update)
            return
        self._apply_meta(state, data)

    def _apply_meta(self, state: CallState, raw: bytes | str) -> None:
        try:
            meta = self._backend.decode_result(raw)
        except (ValueError, TypeError, json.JSONDecodeError):
            log.warning("unreadable result message for call %s", state.id)
            return
        status = str(meta.get("status", states.PENDING))
        if status in states.READY_STATES:
            state.finish(task_result_to_tool_result(state.label, state.id, status, meta.get("result")))
            self._finished(state)
        else:
            state.set_status(status_of(status))

    def _finished(self, state: CallState) -> None:
        if self._calls.get(state.id) is state:
            self._forget(state)

    # -- the safety net --------------------------------------------------------------
    def _on_idle(self) -> None:
        now = time.monotonic()
        if not self._calls or self._sweeping is not None:
            return
        if now - self._last_arrival >= IDLE_SWEEP_INTERVAL and now - self._last_sweep >= IDLE_SWEEP_INTERVAL:
            self._start_sweep(older_than=now - IDLE_SWEEP_INTERVAL)
        elif now - self._last_sweep >= MAX_SWEEP_INTERVAL:
            # Results are flowing: look only at calls outstanding for a long time.
            self._start_sweep(older_than=now - MAX_SWEEP_INTERVAL)

    def _on_reconnect(self) -> None:
        # Results published while the connection was down were missed.
        self._start_sweep(older_than=None)

    def _start_sweep(self, older_than: float | None) -> None:
        self._last_sweep = time.monotonic()
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().create_task(self._sweep(older_than))

    async def _sweep(self, older_than: float | None) -> None:
        try:
            outstanding = [s for s in self._calls.values() if older_than is None or s.added_at <= older_than]
            for i in range(0, len(outstanding), SWEEP_SLICE):
                piece = outstanding[i : i + SWEEP_SLICE]
                raws = await self._results.mget([self.result_channel(s.id) for s in piece])
                for state, raw in zip(piece, raws, strict=True):
                    if raw is not None:
                        self._apply_meta(state, raw)
        except (redis.RedisError, OSError) as exc:
            log.warning("result sweep failed: %s", exc)  # the listener notices a lost server
        finally:
            self._sweeping = None

    def _on_lost(self, error: BaseException) -> None:
        """The result backend (or state Redis) cannot be reached: every waiter hears it."""
        failure = self._unreachable(error)
        for state in list(self._calls.values()):
            state.fail(failure)
        self._calls.clear()
        self._by_channel.clear()

    async def close(self, error: MCPError) -> None:
        """Stop following everything; waiters fail with ``error``."""
        self._closed = error
        for state in list(self._calls.values()):
            state.fail(error)
        self._calls.clear()
        self._by_channel.clear()
        if self._sweeping is not None:
            self._sweeping.cancel()
        await self._result_listener.close()
        if self._progress_listener is not self._result_listener:
            await self._progress_listener.close()
