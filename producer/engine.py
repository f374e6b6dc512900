"""The fan-out engine: one batch published in rounds, under a window, into
chunk tasks, with its results collected per call.

Shape of a batch (see docs/batch.md for the why):

* calls are packed into **chunk tasks** (``mcpq.call_chunk``, ``chunk_size``
  calls each, chosen by :func:`~mcpq.producer.calls.auto_chunk_size` unless
  given): a worker runs a chunk's calls at once over its pooled sessions, so a
  call does not pay Celery's per-task cost on its own. Every call keeps its own
  id, execution claim, breaker accounting, limits, retries and ToolResult,
  stored under the call's id. ``chunk_size=1`` sends one ``mcpq.call_tool``
  task per call;
* tasks are published in rounds of about :data:`PUBLISH_BATCH` calls; there is
  no giant message, no chord, nothing that collects every result in one
  place on the worker side;
* at most ``window`` calls of a batch are **outstanding** (published, not yet
  answered) at any time; the next round goes out when the window has room for
  it, so 100,000 calls never sit in the broker at once, other producers' calls
  are not stuck behind the whole batch, and memory for pending results stays
  bounded;
* results are read per call by a :class:`~mcpq.producer.collector.ResultCollector`;
* a call never fails the batch: every call ends with one :class:`ToolResult`,
  also when its task raised, was revoked or produced something that is not a
  ToolResult (``internal_error``), or when no result came at all before the
  batch stalled (``timeout``: nothing published and nothing finished for
  ``stall_timeout`` seconds).

Only infrastructure failures end a batch early: a broker or result backend
that cannot be reached raises :class:`MCPConnectionError`.

The engine needs only a :class:`Publisher` (the Celery app, the settings and
the ledger), not a ToolQueue, so :mod:`mcpq.producer.queue` can build on it
without an import cycle.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from celery import Celery, group, states
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from mcpq.producer.calls import (
    Call,
    Progress,
    auto_chunk_size,
    coerce_call,
    invalid_call_result,
    unsent_cancelled_result,
)
from mcpq.producer.collector import PendingCall, ResultCollector, backend_unreachable
from mcpq.producer.fanout_options import DEFAULT_WINDOW, FanOutConfig
from mcpq.producer.publish_policy import PUBLISH_RETRY, RESULT_GRACE
from mcpq.producer.sending import plan_chunks, record_chunks, send_chunks
from mcpq.worker.contract import tracing
from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError, MCPConnectionError
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.redact import describe_call, redact_url
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.task_names import CALL_TOOL, MAX_CHUNK_CALLS
from mcpq.worker.contract.unreachable import is_unreachable

#: Calls published per round. Small enough that publishing one round never
#: holds up reading results for long.
PUBLISH_BATCH = 200
#: How often a batch with ``on_call_progress`` reads its calls' latest progress.
PROGRESS_POLL_INTERVAL = 0.2


def batch_shape(config: FanOutConfig, total: int | None) -> tuple[int | None, int, int]:
    """``(window, chunk_size, publish_batch)`` of a batch of ``total`` calls (None:
    unknown): the window (None: no limit), calls per task (never more than the
    window holds) and calls per publishing round (a whole number of tasks).
    Raises ValueError for a ``chunk_size`` or ``window`` out of range."""
    chunk_size = config.chunk_size
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK_CALLS:
        raise ValueError(f"chunk_size must be from 1 to {MAX_CHUNK_CALLS}")
    window = DEFAULT_WINDOW if config.window is None else config.window
    if window < 0:
        raise ValueError("window must be 0 (no limit) or more")
    size = min(chunk_size or auto_chunk_size(total), window or MAX_CHUNK_CALLS)
    return window or None, size, max(PUBLISH_BATCH // size, 1) * size


def stalled_result(label: str, task_id: str, state: str, stall: float, queue: str) -> ToolResult:
    """The result of a call given up after its batch made no progress for
    ``stall`` seconds, while the call was in Celery ``state``."""
    if state == states.PENDING:
        code = ErrorCode.TIMEOUT
        why = f"still queued (no worker took it): is a worker consuming {queue!r}?"
    else:
        code = ErrorCode.INTERNAL_ERROR
        why = f"in state {state} with no result: its worker may have died"
    return ToolResult(
        success=False,
        tool_name=label,
        error=f"no result for task {task_id} after the batch made no progress "
        f"for {stall:g}s; the call is {why}",
        error_code=code.value,
        request_id=task_id,
        details={"task_id": task_id, "state": state, "stalled": True},
    )


class Publisher(Protocol):
    """What a batch needs from the queue it runs on; a ToolQueue is one."""

    @property
    def app(self) -> Celery:
        """The Celery app tasks are published with and results read from."""
        ...

    @property
    def settings(self) -> Settings:
        """Default queue, default call timeout, broker URL, secret patterns."""
        ...

    def record_in_ledger(
        self, entries: list[tuple[str, dict[str, Any]]], members: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Write ``(task id, ledger message)`` entries before they are published,
        and ``(call id, chunk id)`` members of chunk tasks."""
        ...

    def request_cancel(self, task_ids: Sequence[str]) -> None:
        """Flag calls as cancelled (contract/cancel.py) in one round trip."""
        ...

    def read_progress(self, task_ids: Sequence[str]) -> list[ProgressUpdate | None]:
        """The latest progress of each call (None: none reported), in one round trip."""
        ...


@dataclass(frozen=True, slots=True)
class OutgoingCall:
    """A call about to be published, with its task id and task kwargs."""

    index: int
    call: Call
    task_id: str
    kwargs: dict[str, Any]


class BatchRun:
    """One batch: publishes chunks while the window has room, collects results.

    ``pump()`` is the only driver; whoever iterates owns the batch.
    """

    def __init__(
        self,
        publisher: Publisher,
        calls: Iterable[Call | Mapping[str, Any]],
        config: FanOutConfig,
        *,
        task_ids: Sequence[str] | None = None,
    ) -> None:
        """A batch of ``calls`` (Calls, or mappings :meth:`Call.from_dict` reads)
        published through ``publisher`` as ``config`` says; nothing is published
        before the first :meth:`pump` or :meth:`refill`. ``task_ids`` gives
        every call its task id up front (one per call, in input order), else
        each gets a fresh one when published. Raises ValueError for a
        ``chunk_size`` or ``window`` out of range."""
        self.publisher = publisher
        self.app = publisher.app
        self.queue_name = config.queue or publisher.settings.queue
        self.total: int | None = len(calls) if isinstance(calls, Sized) else None
        #: Calls outstanding at most (None: no limit), calls per task, calls
        #: per publishing round.
        self.window, self.chunk_size, self.publish_batch = batch_shape(config, self.total)
        self.on_progress = config.on_progress
        self.on_call_progress = config.on_call_progress
        #: The latest progress handed to ``on_call_progress``, per outstanding call id.
        self._seen_progress: dict[str, ProgressUpdate] = {}
        self._last_progress_poll = 0.0
        self.cancelled = False
        self._publish_retry = PUBLISH_RETRY
        self._grace = RESULT_GRACE
        self._stall_timeout = config.stall_timeout
        self._longest_call = 0.0
        self._task_ids = task_ids
        self._input = enumerate(calls)
        self.exhausted = False
        self.collector = ResultCollector(self.app)
        self._ready: deque[tuple[int, ToolResult]] = deque()
        #: Ids of the published tasks: groups of single calls, or chunk tasks.
        self.group_ids: list[str] = []
        self.chunk_ids: list[str] = []
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_activity = self.started

    # -- state --------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Every call read from the input and answered, and every answer handed out."""
        return self.exhausted and not self.collector and not self._ready

    def progress(self) -> Progress:
        """Where the batch stands now."""
        return Progress(
            done=self.done,
            failed=self.failed,
            total=self.total,
            submitted=self.submitted,
            elapsed=time.monotonic() - self.started,
        )

    # -- driving ------------------------------------------------------------------
    def pump(self, wait: float) -> list[tuple[int, ToolResult]]:
        """Publish what fits, then return the calls that finished (waiting up to
        ``wait`` seconds for one). Empty only when ``wait`` passed or all is done."""
        self.refill()
        out: list[tuple[int, ToolResult]] = []
        while self._ready:
            out.append(self._ready.popleft())
        if self.on_call_progress is not None:
            self._poll_progress()
            wait = min(wait, PROGRESS_POLL_INTERVAL)
        if not out and self.collector:
            wait = min(wait, self._until_stall())
            out.extend((slot.index, result) for slot, result in self.collector.take(wait))
            if out:
                self._last_activity = time.monotonic()
            elif self._until_stall() <= 0:
                out.extend(self._give_up())
        for _, result in out:
            if result.request_id is not None:
                self._seen_progress.pop(result.request_id, None)
            self.done += 1
            if not result.success:
                self.failed += 1
            if self.on_progress is not None:
                self.on_progress(self.progress())
        return out

    def drain(self) -> Iterator[tuple[int, ToolResult]]:
        """``(index, ToolResult)`` for every call as it finishes, until all are done."""
        while not self.finished:
            yield from self.pump(1.0)

    def close(self) -> None:
        """Stop publishing and following results (published calls keep running)."""
        self.collector.close()

    def cancel(self) -> int:
        """Cancel the batch: ask workers to cancel every published call not
        finished yet (each still ends with its own result, ``cancelled`` unless
        it finished first), and publish nothing more: the calls not sent yet
        end with ``cancelled`` results at once (the rest of the input is read
        for them). Returns how many calls were asked to cancel or ended unsent.
        Raises MCPConnectionError when the state Redis cannot be reached."""
        self.cancelled = True
        ids = self.collector.pending_ids()
        if ids:
            self.publisher.request_cancel(ids)
        before = len(self._ready)
        self.refill()
        return len(ids) + len(self._ready) - before

    def _poll_progress(self) -> None:
        """Hand ``on_call_progress`` the progress that changed since the last poll
        (one MGET over the outstanding calls, at most every PROGRESS_POLL_INTERVAL)."""
        now = time.monotonic()
        if now - self._last_progress_poll < PROGRESS_POLL_INTERVAL or not self.collector:
            return
        self._last_progress_poll = now
        assert self.on_call_progress is not None
        slots = self.collector.pending()
        updates = self.publisher.read_progress([task_id for task_id, _ in slots])
        for (task_id, slot), update in zip(slots, updates, strict=True):
            if update is not None and self._seen_progress.get(task_id) != update:
                self._seen_progress[task_id] = update
                self.on_call_progress(slot.index, update)

    # -- publishing ---------------------------------------------------------------
    def _room(self) -> int:
        if self.window is None:
            return self.publish_batch
        return self.window - len(self.collector)

    def refill(self) -> None:
        """Publish as many rounds as the window has room for (all of the input
        with no window); calls that are not valid calls are answered at once."""
        while not self.exhausted:
            if self.cancelled:
                self._answer_unsent()
                return
            # Whole tasks only: a round waits until the window has room for a full chunk.
            size = min(self.publish_batch, self._room() // self.chunk_size * self.chunk_size)
            if size <= 0:
                return
            batch: list[tuple[int, Call]] = []
            while len(batch) < size:
                try:
                    index, item = next(self._input)
                except StopIteration:
                    self.exhausted = True
                    self.total = self.submitted + len(batch)
                    break
                try:
                    batch.append((index, coerce_call(item)))
                except InvalidArgumentsError as exc:
                    self.submitted += 1
                    self._ready.append((index, invalid_call_result(item, index, exc)))
            if batch:
                self._publish(batch)

    def _answer_unsent(self) -> None:
        """After a cancel: every call not read yet ends ``cancelled``, unsent."""
        for index, item in self._input:
            self.submitted += 1
            task_id = self._task_ids[index] if self._task_ids is not None else None
            self._ready.append((index, unsent_cancelled_result(item, index, task_id)))
        self.exhausted = True
        self.total = self.submitted

    def _publish(self, batch: list[tuple[int, Call]]) -> None:
        settings = self.publisher.settings
        items: list[OutgoingCall] = []
        for index, call in batch:
            task_id = self._task_ids[index] if self._task_ids is not None else str(uuid.uuid4())
            kwargs: dict[str, Any] = {"tool": call.tool, "arguments": call.arguments}
            kwargs["enqueued_at"] = time.time()  # the worker's queue-wait metric
            if call.server is not None:
                kwargs["server"] = call.server
            if call.timeout is not None:
                kwargs["timeout"] = call.timeout
            if self.on_call_progress is not None:
                kwargs["progress"] = True  # only when someone listens: no traffic otherwise
            self._longest_call = max(self._longest_call, call.timeout or settings.default_timeout)
            items.append(OutgoingCall(index, call, task_id, kwargs))
        with self._publishing():
            if self.chunk_size == 1:
                self._publish_singles(items)
            else:
                self._publish_chunks(items)
        self.submitted += len(batch)
        self._last_activity = time.monotonic()

    def _publish_singles(self, items: list[OutgoingCall]) -> None:
        """One ``mcpq.call_tool`` task per call, published as one group."""
        patterns = self.publisher.settings.secret_pattern_list()
        shown = [describe_call(o.call.label, o.call.arguments, patterns) for o in items]
        self.publisher.record_in_ledger(
            [
                (o.task_id, ledger_message(o.kwargs, self.queue_name, s))
                for o, s in zip(items, shown, strict=True)
            ]
        )
        signatures = [
            self.app.signature(CALL_TOOL, kwargs=o.kwargs, task_id=o.task_id, argsrepr="()", kwargsrepr=s)
            for o, s in zip(items, shown, strict=True)
        ]
        calls = group(signatures, app=self.app)
        options = {"queue": self.queue_name, "retry": True, "retry_policy": self._publish_retry}
        if tracing.active() is None:
            group_result = calls.apply_async(add_to_parent=False, **options)
        else:
            # Each call published in a span of its own (a trace linked to the
            # batch's span), not the whole group under the batch's one trace.
            group_result = calls.freeze()
            with self.app.producer_or_acquire() as producer:
                for o, signature in zip(items, calls.tasks, strict=True):
                    with tracing.fan_out_call_span(o.call.tool, o.call.server, self.queue_name):
                        signature.apply_async(producer=producer, add_to_parent=False, **options)
        self.group_ids.append(str(group_result.id))
        children = {str(r.id): r for r in group_result.results}
        for o in items:
            result = children.get(o.task_id) or AsyncResult(o.task_id, app=self.app)
            self.collector.add(PendingCall(o.index, o.call.label, result, o.call.timeout))

    def _publish_chunks(self, items: list[OutgoingCall]) -> None:
        """``chunk_size`` calls per ``mcpq.call_chunk`` task. The chunk has no
        result of its own: each call's result is stored under the call's id."""
        chunks = plan_chunks([({"id": o.task_id, **o.kwargs}, o.call.label) for o in items], self.chunk_size)
        record_chunks(self.publisher.record_in_ledger, chunks, self.queue_name)
        # Listen before publishing, so no result can come before its listener.
        for o in items:
            self.collector.add(
                PendingCall(o.index, o.call.label, AsyncResult(o.task_id, app=self.app), o.call.timeout)
            )
        self.chunk_ids.extend(send_chunks(self.app, chunks, self.queue_name, self._publish_retry))

    @contextlib.contextmanager
    def _publishing(self) -> Iterator[None]:
        """Unreachable broker or result backend -> MCPConnectionError that names it."""
        try:
            yield
        except (OperationalError, redis.RedisError, OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError):
                if not is_unreachable(exc):
                    raise
                # Subscribing to the results failed: the result backend is the one down.
                raise backend_unreachable(self.app, exc.__cause__ or exc) from None
            url = redact_url(self.publisher.settings.broker_url)
            raise MCPConnectionError(
                f"cannot reach the broker at {url}: {exc}; set MCPQ_BROKER_URL or start Redis",
                details={"broker": url},
            ) from None

    def track(self, index: int, label: str, task_id: str) -> None:
        """Follow a call published elsewhere (e.g. by another process): input
        ``index``, ``label`` for results made up here, and its ``task_id``."""
        self.collector.add(PendingCall(index, label, AsyncResult(task_id, app=self.app), None))
        self.submitted += 1

    def follow(self, tasks: Sequence[tuple[str, str]]) -> None:
        """Make this batch (built with no input) follow calls published
        elsewhere: ``(task id, label)`` per call, in input order."""
        for index, (task_id, label) in enumerate(tasks):
            self.track(index, label, task_id)
        self.exhausted = True
        self.total = len(tasks)
        # They may have finished before this process subscribed to their results.
        self.collector.sweep_soon()

    # -- stalls -------------------------------------------------------------------
    def stall_timeout(self) -> float:
        """Seconds without progress after which outstanding calls are given up:
        the configured one, else the longest call deadline plus RESULT_GRACE."""
        if self._stall_timeout is not None:
            return self._stall_timeout
        longest = self._longest_call or self.publisher.settings.default_timeout
        return longest + self._grace

    def _until_stall(self) -> float:
        return self._last_activity + self.stall_timeout() - time.monotonic()

    def _give_up(self) -> list[tuple[int, ToolResult]]:
        """Nothing finished and nothing was published for stall_timeout seconds:
        end every outstanding call with a failed result that says why."""
        out = [(slot.index, result) for slot, result in self.collector.sweep()]
        known = self.collector.states()
        stall = self.stall_timeout()
        for slot in self.collector.pop_all():
            task_id = str(slot.result.id)
            state = known.get(task_id, states.PENDING)
            out.append((slot.index, stalled_result(slot.label, task_id, state, stall, self.queue_name)))
        self._last_activity = time.monotonic()
        return out
