"""Fan-out: many tool calls at once, packed into chunk tasks, results read per call.

Shape of a batch (see docs/batch.md for the why):

* calls are packed into **chunk tasks** (``mcpq.call_chunk``, ``chunk_size``
  calls each, chosen by :func:`auto_chunk_size` unless given): a worker runs a
  chunk's calls at once over its pooled sessions, so a call does not pay
  Celery's per-task cost on its own. Every call keeps its own id, execution
  claim, breaker accounting, limits, retries and ToolResult, stored under
  the call's id. ``chunk_size=1`` sends one ``mcpq.call_tool`` task per call;
* tasks are published in rounds of about :data:`PUBLISH_BATCH` calls; there is
  no giant message, no chord, nothing that collects every result in one
  place on the worker side;
* at most ``window`` calls of a batch are **outstanding** (published, not yet
  answered) at any time (``None``: :data:`DEFAULT_WINDOW`; ``0``: no limit, the
  default of :func:`submit_many`); the next round goes out
  when the window has room for it, so 100,000 calls never sit in the broker at
  once, other producers' calls are not stuck behind the whole batch, and memory
  for pending results stays bounded;
* results are read **per call** and pushed, not polled: each call's
  ``AsyncResult`` gets a ``then`` callback and the Redis result backend's
  pub/sub connection is drained; the cost per result is constant, never the
  N² of waiting on a whole ``GroupResult``. A full ``MGET`` over the
  outstanding calls runs only when nothing arrived for a while (a safety net
  for lost messages), and is the only mechanism for backends without push;
* a call never fails the batch: every call ends with one :class:`ToolResult`,
  also when its task raised, was revoked or produced something that is not a
  ToolResult (``internal_error``), or when no result came at all before the
  batch stalled (``timeout``: nothing published and nothing finished for
  ``stall_timeout`` seconds).

Only infrastructure failures end a batch early: a broker or result backend
that cannot be reached raises :class:`MCPConnectionError`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import group, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError, MCPConnectionError, MCPTimeoutError
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.redact import describe_call, describe_chunk, redact_url
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.task_names import CALL_CHUNK, CALL_TOOL, MAX_CHUNK_CALLS
from mcpq.worker.contract.unreachable import is_unreachable

if TYPE_CHECKING:
    from mcpq.producer.queue import ToolQueue

#: Calls published per round. Small enough that publishing one round never
#: holds up reading results for long.
PUBLISH_BATCH = 200
#: Most calls :func:`auto_chunk_size` packs into one chunk task.
MAX_AUTO_CHUNK = 25
#: Calls of one batch outstanding (published, not yet answered) at most.
DEFAULT_WINDOW = 2000
#: With push delivery, run a full MGET sweep when nothing arrived for this long...
IDLE_SWEEP_INTERVAL = 1.0
#: ...and at least this often while results keep coming (a lost message must not
#: wait for the whole batch).
MAX_SWEEP_INTERVAL = 15.0
#: How often to poll when the result backend cannot push.
POLL_INTERVAL = 0.05
#: How long a look without waiting may spend reading messages already there.
POLL_DRAIN_BUDGET = 0.01

ProgressCallback = Callable[["Progress"], None]

_CALL_KEYS = frozenset({"tool", "arguments", "server", "timeout"})


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call of a batch. ``tool`` may be ``server/tool``."""

    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    server: str | None = None
    timeout: float | None = None

    @property
    def label(self) -> str:
        return self.tool if self.server is None else f"{self.server}/{self.tool}"

    @classmethod
    def from_dict(
        cls,
        raw: Any,
        *,
        default_server: str | None = None,
        default_timeout: float | None = None,
    ) -> Call:
        """``{"tool": ..., "arguments": {...}, "server": ..., "timeout": ...}`` -> Call.

        Raises :class:`InvalidArgumentsError` saying what is wrong. ``server``
        and ``timeout`` fall back to the defaults when absent or null."""
        if not isinstance(raw, Mapping):
            raise InvalidArgumentsError(f"a call must be a JSON object, got {_type_name(raw)}")
        unknown = sorted(str(k) for k in raw if k not in _CALL_KEYS)
        if unknown:
            raise InvalidArgumentsError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; "
                f"a call has {', '.join(sorted(_CALL_KEYS))}"
            )
        tool = raw.get("tool")
        if tool is None:
            raise InvalidArgumentsError("missing 'tool'")
        if not isinstance(tool, str) or not tool.strip():
            raise InvalidArgumentsError(f"'tool' must be a non-empty string, got {_type_name(tool)}")
        arguments = raw.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            raise InvalidArgumentsError(
                f"'arguments' of {tool!r} must be a JSON object, got {_type_name(arguments)}"
            )
        server = raw.get("server")
        if server is None:
            server = default_server
        elif not isinstance(server, str) or not server:
            raise InvalidArgumentsError(f"'server' must be a non-empty string, got {_type_name(server)}")
        timeout = raw.get("timeout")
        if timeout is None:
            timeout = default_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgumentsError(f"'timeout' must be a positive number of seconds, got {timeout!r}")
        return cls(
            tool=tool,
            arguments=dict(arguments),
            server=server,
            timeout=float(timeout) if timeout is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a batch stands. ``total`` is None while the input's length is unknown
    (a generator not read to its end yet)."""

    done: int
    failed: int
    total: int | None
    #: Calls published (or answered without publishing) so far.
    submitted: int = 0
    #: Seconds since the batch started.
    elapsed: float = 0.0

    @property
    def succeeded(self) -> int:
        return self.done - self.failed

    @property
    def in_flight(self) -> int:
        return self.submitted - self.done

    @property
    def rate(self) -> float:
        """Calls finished per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None when unknown)."""
        if self.total is None or self.done == 0:
            return None
        return max(self.total - self.done, 0) / self.rate if self.rate > 0 else None


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def auto_chunk_size(total: int | None) -> int:
    """Calls per chunk task when the caller names none: one per task for a small
    batch (its calls spread over every free worker slot at once), more as the
    batch grows, up to :data:`MAX_AUTO_CHUNK` (a batch of unknown length too),
    while a batch still makes at least 16 tasks to spread over workers."""
    if total is None:
        return MAX_AUTO_CHUNK
    return max(1, min(MAX_AUTO_CHUNK, total // 16))


def coerce_call(item: Call | Mapping[str, Any]) -> Call:
    """A Call as is; a mapping through :meth:`Call.from_dict` (may raise InvalidArgumentsError)."""
    return item if isinstance(item, Call) else Call.from_dict(item)


def task_result_to_tool_result(label: str, task_id: str, state: str, value: Any) -> ToolResult:
    """What a finished ``mcpq.call_tool`` task means as a ToolResult: its own
    result when it returned one, else an ``internal_error`` that says why."""
    if state == states.SUCCESS and isinstance(value, dict) and "success" in value:
        try:
            return ToolResult.from_dict(value)
        except (TypeError, ValueError):
            pass
    return ToolResult(
        success=False,
        tool_name=label,
        error=f"task {task_id} ended in state {state}: {value!r}"[:2000],
        error_code=ErrorCode.INTERNAL_ERROR.value,
        request_id=task_id,
        details={"task_id": task_id, "state": state},
    )


# --------------------------------------------------------------------------- result collection


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A call about to be published, with its task id and task kwargs."""

    index: int
    call: Call
    task_id: str
    kwargs: dict[str, Any]


@dataclass(slots=True)
class _Slot:
    index: int
    label: str
    result: AsyncResult
    timeout: float | None
    added_at: float = field(default_factory=time.monotonic)


class _Collector:
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
        self._pending: dict[str, _Slot] = {}
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
        return self._consumer is not None

    def add(self, slot: _Slot) -> None:
        self._pending[str(slot.result.id)] = slot
        if self._consumer is not None:
            # Fires when the backend hands the result over (possibly at once,
            # from the backend's buffer); the callback gets the AsyncResult.
            slot.result.then(self._arrived.append)

    def take(self, wait: float) -> list[tuple[_Slot, ToolResult]]:
        """Finished calls, waiting up to ``wait`` seconds for at least one."""
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

    def _maybe_sweep(self, now: float) -> list[tuple[_Slot, ToolResult]]:
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
            raise _backend_unreachable(self.app, exc.__cause__ or exc) from None
        finally:
            self._idle += time.monotonic() - started

    def _take_arrived(self) -> list[tuple[_Slot, ToolResult]]:
        out: list[tuple[_Slot, ToolResult]] = []
        while self._arrived:
            result = self._arrived.popleft()
            slot = self._pending.pop(str(result.id), None)
            if slot is None:  # already finished by a sweep
                continue
            out.append((slot, self._convert(slot, result.state, result.result)))
        if out:
            self._idle = 0.0
        return out

    def _convert(self, slot: _Slot, state: str, value: Any) -> ToolResult:
        return task_result_to_tool_result(slot.label, str(slot.result.id), str(state), value)

    def sweep(self, older_than: float | None = None) -> list[tuple[_Slot, ToolResult]]:
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
        out: list[tuple[_Slot, ToolResult]] = []
        try:
            for task_id, meta in self._ready_metas(ids):
                slot = self._pending.pop(task_id, None)
                if slot is None:
                    continue
                out.append((slot, self._convert(slot, meta["status"], meta.get("result"))))
                self._forget_waiter(slot)
        except (redis.RedisError, OSError) as exc:
            raise _backend_unreachable(self.app, exc) from None
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

    def states(self) -> dict[str, str]:
        """Last known state of every outstanding call (one read each, for diagnostics)."""
        out: dict[str, str] = {}
        for task_id in list(self._pending):
            try:
                out[task_id] = str(self.backend.get_task_meta(task_id).get("status", states.PENDING))
            except (redis.RedisError, OSError):
                out[task_id] = "UNKNOWN"
        return out

    def pop_all(self) -> list[_Slot]:
        slots = list(self._pending.values())
        self._pending.clear()
        for slot in slots:
            self._forget_waiter(slot)
        return slots

    def _forget_waiter(self, slot: _Slot) -> None:
        # Stop waiting on this id (unsubscribes from its result channel).
        if self._consumer is not None:
            # best effort: the subscription goes away with the result anyway
            with contextlib.suppress(Exception):
                self.backend.remove_pending_result(slot.result)

    def close(self) -> None:
        self.pop_all()
        self._arrived.clear()


def _backend_unreachable(app: Any, exc: BaseException) -> MCPConnectionError:
    url = redact_url(str(app.conf.result_backend))
    return MCPConnectionError(
        f"cannot reach the result backend at {url}: {exc}; set MCPQ_RESULT_BACKEND or start Redis",
        details={"backend": url},
    )


# --------------------------------------------------------------------------- the engine


class _Run:
    """One batch: publishes chunks while the window has room, collects results.

    ``pump()`` is the only driver; whoever iterates owns the batch.
    """

    def __init__(
        self,
        tq: ToolQueue,
        calls: Iterable[Call | Mapping[str, Any]],
        *,
        chunk_size: int | None,
        window: int | None,
        queue: str | None,
        stall_timeout: float | None,
        on_progress: ProgressCallback | None,
        task_ids: Sequence[str] | None = None,
    ) -> None:
        from mcpq.producer.queue import PUBLISH_RETRY, RESULT_GRACE

        if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK_CALLS:
            raise ValueError(f"chunk_size must be from 1 to {MAX_CHUNK_CALLS}")
        if window is None:
            window = DEFAULT_WINDOW
        if window < 0:
            raise ValueError("window must be 0 (no limit) or more")
        self.tq = tq
        self.app = tq.app
        self.queue_name = queue or tq.settings.queue
        self.total: int | None = len(calls) if isinstance(calls, Sized) else None
        self.window = window or None
        #: Calls per task (never more than the window holds), and calls per
        #: publishing round (a whole number of tasks).
        self.chunk_size = min(chunk_size or auto_chunk_size(self.total), self.window or MAX_CHUNK_CALLS)
        self.publish_batch = max(PUBLISH_BATCH // self.chunk_size, 1) * self.chunk_size
        self.on_progress = on_progress
        self._publish_retry = PUBLISH_RETRY
        self._grace = RESULT_GRACE
        self._stall_timeout = stall_timeout
        self._longest_call = 0.0
        self._task_ids = task_ids
        self._input = enumerate(calls)
        self.exhausted = False
        self.collector = _Collector(self.app)
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
        return self.exhausted and not self.collector and not self._ready

    def progress(self) -> Progress:
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
        self._refill()
        out: list[tuple[int, ToolResult]] = []
        while self._ready:
            out.append(self._ready.popleft())
        if not out and self.collector:
            wait = min(wait, self._until_stall())
            out.extend((slot.index, result) for slot, result in self.collector.take(wait))
            if out:
                self._last_activity = time.monotonic()
            elif self._until_stall() <= 0:
                out.extend(self._give_up())
        for _, result in out:
            self.done += 1
            if not result.success:
                self.failed += 1
            if self.on_progress is not None:
                self.on_progress(self.progress())
        return out

    def drain(self) -> Iterator[tuple[int, ToolResult]]:
        while not self.finished:
            yield from self.pump(1.0)

    def close(self) -> None:
        self.collector.close()

    # -- publishing ---------------------------------------------------------------
    def _room(self) -> int:
        if self.window is None:
            return self.publish_batch
        return self.window - len(self.collector)

    def _refill(self) -> None:
        while not self.exhausted:
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
                    self._ready.append((index, _invalid_call(item, index, exc)))
            if batch:
                self._publish(batch)

    def _publish(self, batch: list[tuple[int, Call]]) -> None:
        settings = self.tq.settings
        items: list[_Outgoing] = []
        for index, call in batch:
            task_id = self._task_ids[index] if self._task_ids is not None else str(uuid.uuid4())
            kwargs: dict[str, Any] = {"tool": call.tool, "arguments": call.arguments}
            if call.server is not None:
                kwargs["server"] = call.server
            if call.timeout is not None:
                kwargs["timeout"] = call.timeout
            self._longest_call = max(self._longest_call, call.timeout or settings.default_timeout)
            items.append(_Outgoing(index, call, task_id, kwargs))
        with self._publishing():
            if self.chunk_size == 1:
                self._publish_singles(items)
            else:
                self._publish_chunks(items)
        self.submitted += len(batch)
        self._last_activity = time.monotonic()

    def _publish_singles(self, items: list[_Outgoing]) -> None:
        """One ``mcpq.call_tool`` task per call, published as one group."""
        patterns = self.tq.settings.secret_pattern_list()
        shown = [describe_call(o.call.label, o.call.arguments, patterns) for o in items]
        self.tq.record_in_ledger(
            [
                (o.task_id, ledger_message(o.kwargs, self.queue_name, s))
                for o, s in zip(items, shown, strict=True)
            ]
        )
        signatures = [
            self.app.signature(CALL_TOOL, kwargs=o.kwargs, task_id=o.task_id, argsrepr="()", kwargsrepr=s)
            for o, s in zip(items, shown, strict=True)
        ]
        group_result = group(signatures, app=self.app).apply_async(
            queue=self.queue_name, retry=True, retry_policy=self._publish_retry, add_to_parent=False
        )
        self.group_ids.append(str(group_result.id))
        children = {str(r.id): r for r in group_result.results}
        for o in items:
            result = children.get(o.task_id) or AsyncResult(o.task_id, app=self.app)
            self.collector.add(_Slot(o.index, o.call.label, result, o.call.timeout))

    def _publish_chunks(self, items: list[_Outgoing]) -> None:
        """``chunk_size`` calls per ``mcpq.call_chunk`` task. The chunk has no
        result of its own: each call's result is stored under the call's id."""
        chunks: list[tuple[str, list[dict[str, Any]], str]] = []
        for start in range(0, len(items), self.chunk_size):
            piece = items[start : start + self.chunk_size]
            calls = [{"id": o.task_id, **o.kwargs} for o in piece]
            chunks.append((str(uuid.uuid4()), calls, describe_chunk([o.call.label for o in piece])))
        self.tq.record_in_ledger(
            [
                (chunk_id, ledger_message({"calls": calls}, self.queue_name, shown, task=CALL_CHUNK))
                for chunk_id, calls, shown in chunks
            ]
        )
        # Listen before publishing, so no result can come before its listener.
        for o in items:
            self.collector.add(
                _Slot(o.index, o.call.label, AsyncResult(o.task_id, app=self.app), o.call.timeout)
            )
        with self.app.producer_or_acquire() as producer:
            for chunk_id, calls, shown in chunks:
                self.app.send_task(
                    CALL_CHUNK,
                    kwargs={"calls": calls},
                    task_id=chunk_id,
                    queue=self.queue_name,
                    producer=producer,
                    retry=True,
                    retry_policy=self._publish_retry,
                    ignore_result=True,
                    argsrepr="()",
                    kwargsrepr=shown,
                )
                self.chunk_ids.append(chunk_id)

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
                raise _backend_unreachable(self.app, exc.__cause__ or exc) from None
            url = redact_url(self.tq.settings.broker_url)
            raise MCPConnectionError(
                f"cannot reach the broker at {url}: {exc}; set MCPQ_BROKER_URL or start Redis",
                details={"broker": url},
            ) from None

    def track(self, index: int, label: str, task_id: str) -> None:
        """Follow a call published elsewhere (e.g. by another process)."""
        self.collector.add(_Slot(index, label, AsyncResult(task_id, app=self.app), None))
        self.submitted += 1

    # -- stalls -------------------------------------------------------------------
    def stall_timeout(self) -> float:
        if self._stall_timeout is not None:
            return self._stall_timeout
        longest = self._longest_call or self.tq.settings.default_timeout
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
            if state == states.PENDING:
                code = ErrorCode.TIMEOUT
                why = f"still queued (no worker took it): is a worker consuming {self.queue_name!r}?"
            else:
                code = ErrorCode.INTERNAL_ERROR
                why = f"in state {state} with no result: its worker may have died"
            out.append(
                (
                    slot.index,
                    ToolResult(
                        success=False,
                        tool_name=slot.label,
                        error=f"no result for task {task_id} after the batch made no progress "
                        f"for {stall:g}s; the call is {why}",
                        error_code=code.value,
                        request_id=task_id,
                        details={"task_id": task_id, "state": state, "stalled": True},
                    ),
                )
            )
        self._last_activity = time.monotonic()
        return out


def _invalid_call(item: Any, index: int, exc: InvalidArgumentsError) -> ToolResult:
    tool = item.get("tool") if isinstance(item, Mapping) else None
    return ToolResult(
        success=False,
        tool_name=tool if isinstance(tool, str) and tool else "?",
        error=f"call {index}: {exc.message}",
        error_code=ErrorCode.INVALID_ARGUMENTS.value,
        details={"index": index},
    )


# --------------------------------------------------------------------------- public API


def as_completed(
    tq: ToolQueue,
    calls: Iterable[Call | Mapping[str, Any]],
    *,
    on_progress: ProgressCallback | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    queue: str | None = None,
    stall_timeout: float | None = None,
) -> Generator[tuple[int, ToolResult], None, None]:
    """Run ``calls`` and yield ``(index, ToolResult)`` as each finishes (every
    index exactly once). ``calls`` is read lazily, ``window`` calls ahead of
    the results. Closing the iterator early stops publishing; calls already
    published still run."""
    run = _Run(
        tq,
        calls,
        chunk_size=chunk_size,
        window=window,
        queue=queue,
        stall_timeout=stall_timeout,
        on_progress=on_progress,
    )
    try:
        yield from run.drain()
    finally:
        run.close()


def fan_out(
    tq: ToolQueue,
    calls: Iterable[Call | Mapping[str, Any]],
    *,
    on_progress: ProgressCallback | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    queue: str | None = None,
    stall_timeout: float | None = None,
) -> list[ToolResult]:
    """Run ``calls``; return one ToolResult per call, in input order."""
    results: dict[int, ToolResult] = {}
    for index, result in as_completed(
        tq,
        calls,
        on_progress=on_progress,
        chunk_size=chunk_size,
        window=window,
        queue=queue,
        stall_timeout=stall_timeout,
    ):
        results[index] = result
    return [results[i] for i in range(len(results))]


def map_calls(
    tq: ToolQueue,
    tool: str,
    arguments: Iterable[Mapping[str, Any]],
    *,
    server: str | None = None,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    queue: str | None = None,
    stall_timeout: float | None = None,
) -> list[ToolResult]:
    """``tool`` once per arguments dict; results in the same order."""
    calls = (
        Call(tool, dict(a), server, timeout)
        if isinstance(a, Mapping)
        else {"tool": tool, "arguments": a, "server": server, "timeout": timeout}
        for a in arguments
    )
    sized: Iterable[Call | Mapping[str, Any]] = list(calls) if isinstance(arguments, Sized) else calls
    return fan_out(
        tq,
        sized,
        on_progress=on_progress,
        chunk_size=chunk_size,
        window=window,
        queue=queue,
        stall_timeout=stall_timeout,
    )


class FanOutHandle:
    """A batch submitted without waiting.

    ``ids`` holds every call's task id in input order from the start. With
    ``window=0`` (the default here) every call is published before
    :func:`submit_many` returns; with a window, the rest are published while
    ``iter_completed()`` / ``results()`` run. Read it from one thread at a time.
    """

    def __init__(self, run: _Run, ids: list[str], labels: list[str]) -> None:
        self._run = run
        self.ids = ids
        self.labels = labels
        self._results: list[ToolResult | None] = [None] * len(ids)

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def group_ids(self) -> list[str]:
        """Celery group ids, when calls went out one task each (``chunk_size=1``)."""
        return list(self._run.group_ids)

    @property
    def chunk_ids(self) -> list[str]:
        """Task ids of the ``mcpq.call_chunk`` tasks the calls went out in."""
        return list(self._run.chunk_ids)

    @property
    def progress(self) -> Progress:
        return self._run.progress()

    def done(self) -> bool:
        return self._run.finished

    def poll(self) -> list[tuple[int, ToolResult]]:
        """What finished since the last look, without waiting."""
        return self._record(self._run.pump(0.0))

    def iter_completed(self, timeout: float | None = None) -> Iterator[tuple[int, ToolResult]]:
        """Yield ``(index, ToolResult)`` for calls not yielded before, as they
        finish. Raises MCPTimeoutError if ``timeout`` seconds pass first (the
        calls keep running; iterate again to go on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._run.finished:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                p = self.progress
                raise MCPTimeoutError(
                    f"batch not finished within {timeout:g}s ({p.done} of {p.total} calls done)",
                    details={"done": p.done, "total": p.total},
                )
            yield from self._record(self._run.pump(min(wait, 1.0)))

    def results(self, timeout: float | None = None) -> list[ToolResult]:
        """Wait for every call; one ToolResult per call, in input order."""
        for _ in self.iter_completed(timeout):
            pass
        return [r for r in self._results if r is not None]

    def _record(self, items: list[tuple[int, ToolResult]]) -> list[tuple[int, ToolResult]]:
        for index, result in items:
            self._results[index] = result
        return items

    def close(self) -> None:
        """Stop following the batch (the calls themselves keep running)."""
        self._run.close()

    def __enter__(self) -> FanOutHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.progress
        return f"<FanOutHandle {p.done}/{p.total} done, {p.failed} failed>"

    @classmethod
    def attach(cls, tq: ToolQueue, ids: Sequence[str], labels: Sequence[str] | None = None) -> FanOutHandle:
        """Follow calls published earlier (say by another process) by their task ids."""
        names = list(labels) if labels is not None else ["?"] * len(ids)
        if len(names) != len(ids):
            raise ValueError("labels must match ids one to one")
        run = _Run(tq, (), chunk_size=None, window=0, queue=None, stall_timeout=None, on_progress=None)
        for index, (task_id, label) in enumerate(zip(ids, names, strict=True)):
            run.track(index, label, str(task_id))
        run.exhausted = True
        run.total = len(ids)
        run.collector.sweep_soon()
        return cls(run, [str(i) for i in ids], names)


def submit_many(
    tq: ToolQueue,
    calls: Iterable[Call | Mapping[str, Any]],
    *,
    chunk_size: int | None = None,
    window: int | None = 0,
    queue: str | None = None,
    stall_timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
) -> FanOutHandle:
    """Publish a batch and return a :class:`FanOutHandle` at once."""
    items = list(calls)
    ids = [str(uuid.uuid4()) for _ in items]
    labels = []
    for item in items:
        if isinstance(item, Call):
            labels.append(item.label)
        else:
            tool = item.get("tool") if isinstance(item, Mapping) else None
            server = item.get("server") if isinstance(item, Mapping) else None
            labels.append(f"{server}/{tool}" if server else str(tool or "?"))
    run = _Run(
        tq,
        items,
        chunk_size=chunk_size,
        window=window,
        queue=queue,
        stall_timeout=stall_timeout,
        on_progress=on_progress,
        task_ids=ids,
    )
    run._refill()
    return FanOutHandle(run, ids, labels)
