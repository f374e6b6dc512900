"""Relaying a running call's progress notifications to Redis, coalesced.

Only a call sent with ``progress=True`` gets a :class:`ProgressRelay` (and so
a ``progressToken``); every other call costs no Redis traffic. A server may
report progress far more often than anyone reads it, so a relay writes at
most one update per :data:`PROGRESS_INTERVAL` (the latest wins) and, when the
call ends, flushes the latest once more before its result is returned: a
reader sees the final progress no later than the result.

The SDK calls the relay on the event loop, which must never wait on Redis:
writes go to the manager's single state-writer thread (one thread keeps them
in order), and a relay never has more than one write queued there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import redis

from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.progress import PROGRESS_INTERVAL, PROGRESS_TTL, ProgressUpdate

log = logging.getLogger(__name__)

#: ``schedule(delay, fn)``: run ``fn`` after ``delay`` seconds (on the loop, by default).
Schedule = Callable[[float, Callable[[], None]], Any]
#: ``sink(call_id, update)``: write one update (blocking; runs on the executor).
Sink = Callable[[str, ProgressUpdate], None]

#: How long the final flush may hold a call's result back.
FLUSH_TIMEOUT = 2.0


def _on_running_loop(delay: float, fn: Callable[[], None]) -> Any:
    return asyncio.get_running_loop().call_later(delay, fn)


class ProgressRelay:
    """One call's progress: an async callback for the SDK, coalescing its writes."""

    def __init__(
        self,
        call_id: str,
        sink: Sink,
        executor: Executor,
        *,
        interval: float = PROGRESS_INTERVAL,
        schedule: Schedule = _on_running_loop,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        :param call_id: the call whose progress this is (``Keys.progress``).
        :param sink: writes one update to Redis; called on ``executor``.
        :param executor: where writes run (never the event loop).
        :param interval: the least time between two writes.
        :param schedule: runs a deferred flush; must be callable from where
            updates arrive (the loop's ``call_later`` by default).
        :param clock: monotonic seconds.
        """
        self.call_id = call_id
        self._sink = sink
        self._executor = executor
        self._interval = interval
        self._schedule = schedule
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: ProgressUpdate | None = None
        self._last_write = -float("inf")
        self._timer_armed = False
        self._writing: concurrent.futures.Future[None] | None = None
        self._closed = False

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        """The SDK's ``progress_callback``: one ``notifications/progress`` arrived."""
        self.offer(ProgressUpdate(progress, total, message))

    def offer(self, update: ProgressUpdate) -> None:
        """Take the newest update: write it now, or keep it for the next write."""
        with self._lock:
            if self._closed:
                return
            self._latest = update
            if self._timer_armed:
                return  # the armed flush writes whatever is latest then
            wait = self._last_write + self._interval - self._clock()
            if wait <= 0 and not self._busy():
                self._write_locked()
                return
            self._timer_armed = True
        # Too soon after the last write, or it is still going: flush later.
        self._schedule(wait if wait > 0 else self._interval, self._deferred)

    def _busy(self) -> bool:
        # A write still queued or running (a slow Redis): never queue a second.
        return self._writing is not None and not self._writing.done()

    def _deferred(self) -> None:
        with self._lock:
            self._timer_armed = False
            if self._closed or self._latest is None:
                return
            if self._busy():
                self._timer_armed = True
            else:
                self._write_locked()
                return
        self._schedule(self._interval, self._deferred)

    def _write_locked(self) -> None:
        update, self._latest = self._latest, None
        assert update is not None
        self._last_write = self._clock()
        self._writing = self._executor.submit(self._sink, self.call_id, update)

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """The call ended: write the latest update, if any is unwritten, and wait for it.

        Called from the task thread before the result is returned; later
        updates (a server still reporting after the result) are dropped.
        """
        with self._lock:
            self._closed = True
            if self._latest is not None:
                self._write_locked()
            writing = self._writing
        if writing is not None:
            try:
                writing.result(timeout)
            except Exception as exc:  # progress is best effort; the result is not
                log.debug("last progress of call %s not written: %s", self.call_id, exc)


class ProgressPublisher:
    """Makes the relays of one process; writes updates to the state Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, executor: Executor) -> None:
        """
        :param client: the state Redis.
        :param keys: the key layout.
        :param executor: the manager's state-writer thread.
        """
        self.redis = client
        self.keys = keys
        self.executor = executor
        self._warned = False

    def relay(self, call_id: str) -> ProgressRelay:
        """A relay for call ``call_id``, to pass as the SDK's ``progress_callback``."""
        return ProgressRelay(call_id, self.write, self.executor)

    def write(self, call_id: str, update: ProgressUpdate) -> None:
        """One update: the latest kept under ``Keys.progress`` and published on the same name."""
        key, doc = self.keys.progress(call_id), update.to_json()
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(key, doc, ex=PROGRESS_TTL)
            pipe.publish(key, doc)
            pipe.execute()
        except redis.RedisError as exc:
            if not self._warned:  # once per process: a dead Redis must not flood the log
                self._warned = True
                log.warning("progress updates are not reaching the state Redis: %s", exc)
            return
        self._warned = False
