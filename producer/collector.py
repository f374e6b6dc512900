"""Result collection for a fan-out: the outstanding calls of one batch and the
results that arrived for them.

Results are read **per call** and pushed, not polled: each call's
``AsyncResult`` gets a ``then`` callback and the Redis result backend's pub/sub
connection is drained, so the cost per result is constant, never the N² of
waiting on a whole ``GroupResult``. A full ``MGET`` over the outstanding calls
runs only when nothing arrived for a while (a safety net for lost messages),
and is the only mechanism for backends without push.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from mcpq.producer.calls import task_result_to_tool_result
from mcpq.worker.contract.errors import MCPConnectionError
from mcpq.worker.contract.redact import redact_url
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.unreachable import is_unreachable

#: With push delivery, run a full MGET sweep when nothing arrived for this long...
IDLE_SWEEP_INTERVAL = 1.0
#: ...and at least this often while results keep coming (a lost message must not
#: wait for the whole batch).
MAX_SWEEP_INTERVAL = 15.0
#: How often to poll when the result backend cannot push.
POLL_INTERVAL = 0.05
#: How long a look without waiting may spend reading messages already there.
POLL_DRAIN_BUDGET = 0.01


@dataclass(slots=True)
class PendingCall:
    """A published call the batch still waits for: its input index, its label
    for results made up here, and the ``AsyncResult`` its ToolResult comes on."""

    index: int
    label: str
    result: AsyncResult
    timeout: float | None
    added_at: float = field(default_factory=time.monotonic)


class ResultCollector:
    """Outstanding calls of one batch and the results that arrived for them.

    Push where the backend can (``AsyncResult.then`` plus draining the result
    backend's consumer: Redis pub/sub), one MGET sweep over the outstanding ids
    when nothing arrived for a while, and polling sweeps for backends that
    cannot push. Not thread-safe: one consumer per batch.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.backend = app.backend
        consumer = getattr(self.backend, "result_consumer", None) if self.backend.is_async else None
        self._consumer = consumer if hasattr(consumer, "drain_events") else None
        self._pending: dict[str, PendingCall] = {}
        self._arrived: deque[AsyncResult] = deque()
        #: Seconds spent waiting inside take() since something last arrived: time
        #: spent elsewhere (publishing a chunk) must not count as silence.
        self._idle = 0.0
        self._last_sweep = time.monotonic()
        self._full_sweep_due = False

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pushes(self) -> bool:
        """Whether results arrive pushed (pub/sub) rather than by polling sweeps."""
        return self._consumer is not None

    def add(self, slot: PendingCall) -> None:
        """Wait for ``slot``'s result from now on."""
        self._pending[str(slot.result.id)] = slot
        if self._consumer is not None:
            # Fires when the backend hands the result over (possibly at once,
            # from the backend's buffer); the callback gets the AsyncResult.
            slot.result.then(self._arrived.append)

    def take(self, wait: float) -> list[tuple[PendingCall, ToolResult]]:
        """Finished calls, waiting up to ``wait`` seconds for at least one
        (``wait <= 0``: only what already came)."""
        deadline = time.monotonic() + wait
        if wait <= 0:
            self._read_what_came()  # a look without waiting (FanOutHandle.poll)
        while True:
            out = self._take_arrived()
            now = time.monotonic()
            if not out and self._pending:
                out = self._maybe_sweep(now)
            if out or not self._pending or now >= deadline:
                return out
            self._wait(deadline - now)

    def sweep_soon(self) -> None:
        """Sweep on the next take(): for calls that may have finished before
        this process subscribed to their results."""
        self._full_sweep_due = True

    def _maybe_sweep(self, now: float) -> list[tuple[PendingCall, ToolResult]]:
        if self._consumer is None:
            return self.sweep() if now - self._last_sweep >= POLL_INTERVAL else []
        if self._full_sweep_due:
            return self.sweep()
        if self._idle >= IDLE_SWEEP_INTERVAL:
            # Quiet for a while. Read what is already on the connection first, so
            # the sweep does not race results whose messages are just arriving.
            self._read_what_came(budget=5 * POLL_DRAIN_BUDGET)
            return self._take_arrived() or self.sweep()
        if now - self._last_sweep >= MAX_SWEEP_INTERVAL:
            # Results are flowing: look only at calls outstanding for a long time.
            # Recently finished ones have their message on the way; reading them
            # here too would only leave those messages without a reader.
            return self.sweep(older_than=now - MAX_SWEEP_INTERVAL)
        return []

    def _read_what_came(self, budget: float = POLL_DRAIN_BUDGET) -> None:
        """Read the messages already waiting on the pub/sub connection (bounded)."""
        if self._consumer is None:
            return
        end = time.monotonic() + budget
        while self._pending and time.monotonic() < end:
            self._wait(0.0)

    def _wait(self, remaining: float) -> None:
        started = time.monotonic()
        try:
            if self._consumer is None:
                time.sleep(min(POLL_INTERVAL, max(remaining, 0.0)))
            else:
                self._consumer.drain_events(timeout=min(max(remaining, 0.0), IDLE_SWEEP_INTERVAL))
        except (TimeoutError, CeleryTimeoutError):
            pass
        except (redis.RedisError, OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not is_unreachable(exc):
                raise
            raise backend_unreachable(self.app, exc.__cause__ or exc) from None
        finally:
            self._idle += time.monotonic() - started

    def _take_arrived(self) -> list[tuple[PendingCall, ToolResult]]:
        out: list[tuple[PendingCall, ToolResult]] = []
        while self._arrived:
            result = self._arrived.popleft()
            slot = self._pending.pop(str(result.id), None)
            if slot is None:  # already finished by a sweep
                continue
            out.append((slot, self._convert(slot, result.state, result.result)))
        if out:
            self._idle = 0.0
        return out

    def _convert(self, slot: PendingCall, state: str, value: Any) -> ToolResult:
        return task_result_to_tool_result(slot.label, str(slot.result.id), str(state), value)

    def sweep(self, older_than: float | None = None) -> list[tuple[PendingCall, ToolResult]]:
        """Read every outstanding call's state (added before ``older_than``, if
        given) in one round trip; return the finished ones."""
        self._last_sweep = time.monotonic()
        self._idle = 0.0
        self._full_sweep_due = False
        ids = [
            task_id
            for task_id, slot in self._pending.items()
            if older_than is None or slot.added_at <= older_than
        ]
        if not ids:
            return []
        out: list[tuple[PendingCall, ToolResult]] = []
        try:
            for task_id, meta in self._ready_metas(ids):
                slot = self._pending.pop(task_id, None)
                if slot is None:
                    continue
                out.append((slot, self._convert(slot, meta["status"], meta.get("result"))))
                self._forget_waiter(slot)
        except (redis.RedisError, OSError) as exc:
            raise backend_unreachable(self.app, exc) from None
        return out

    def _ready_metas(self, task_ids: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        if hasattr(self.backend, "get_many"):
            for task_id, meta in self.backend.get_many(task_ids, interval=0, max_iterations=1):
                # Exceptions stored for failed tasks come back as exception objects.
                yield str(task_id), self.backend.meta_from_decoded(dict(meta))
            return
        for task_id in task_ids:  # backends without MGET: one read per call
            meta = self.backend.get_task_meta(task_id)
            if meta.get("status") in states.READY_STATES:
                yield task_id, meta

    def pending_ids(self) -> list[str]:
        """Task ids of every outstanding call."""
        return list(self._pending)

    def pending(self) -> list[tuple[str, PendingCall]]:
        """``(task id, slot)`` of every outstanding call."""
        return list(self._pending.items())

    def states(self) -> dict[str, str]:
        """Last known state of every outstanding call (one read each, for diagnostics)."""
        out: dict[str, str] = {}
        for task_id in list(self._pending):
            try:
                out[task_id] = str(self.backend.get_task_meta(task_id).get("status", states.PENDING))
            except (redis.RedisError, OSError):
                out[task_id] = "UNKNOWN"
        return out

    def pop_all(self) -> list[PendingCall]:
        """Stop waiting for every outstanding call; return them."""
        slots = list(self._pending.values())
        self._pending.clear()
        for slot in slots:
            self._forget_waiter(slot)
        return slots

    def _forget_waiter(self, slot: PendingCall) -> None:
        # Stop waiting on this id (unsubscribes from its result channel).
        if self._consumer is not None:
            # best effort: the subscription goes away with the result anyway
            with contextlib.suppress(Exception):
                self.backend.remove_pending_result(slot.result)

    def close(self) -> None:
        """Stop waiting for anything (the calls themselves keep running)."""
        self.pop_all()
        self._arrived.clear()


def backend_unreachable(app: Any, exc: BaseException) -> MCPConnectionError:
    """The error for ``app``'s result backend failing with ``exc``: it names the
    backend (password masked) and says how to fix it."""
    url = redact_url(str(app.conf.result_backend))
    return MCPConnectionError(
        f"cannot reach the result backend at {url}: {exc}; set MCPQ_RESULT_BACKEND or start Redis",
        details={"backend": url},
    )
