"""The Celery tasks: thin wrappers over MCPClientManager.

Each validates the shape of its message (a task message is input like any
other) and always returns a JSON-safe dict; an ``mcpq.call_tool`` always
returns a ToolResult dict, never raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery import Task

from mcpq.worker.app import app
from mcpq.worker.claims import CallInProgress
from mcpq.worker.contract import tracing
from mcpq.worker.contract.errors import InternalError, InvalidArgumentsError, MCPError
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.redact import describe_call
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.task_names import (
    CALL_CHUNK,
    CALL_TOOL,
    DISCOVER,
    HEALTH,
    MAX_CHUNK_CALLS,
    RECONNECT,
)
from mcpq.worker.followup import Again, next_step, when_busy
from mcpq.worker.manager import MCPClientManager, get_manager
from mcpq.worker.metrics import check_enqueued_at, queue_wait
from mcpq.worker.metrics import current as metrics
from mcpq.worker.result_writer import ResultWriter
from mcpq.worker.router import LEDGER_CLEARED
from mcpq.worker.tracing import chunk_call, queued

log = logging.getLogger(__name__)


def _check_call_shape(tool: Any, arguments: Any, server: Any, timeout: Any) -> MCPError | None:
    if not isinstance(tool, str) or not tool:
        return InternalError(f"malformed task: 'tool' must be a non-empty string, got {type(tool).__name__}")
    if arguments is not None and not isinstance(arguments, dict):
        return InvalidArgumentsError(
            f"arguments for {tool!r} must be a JSON object, got {type(arguments).__name__}"
        )
    if server is not None and (not isinstance(server, str) or not server):
        return InternalError(f"malformed task: 'server' must be a string, got {type(server).__name__}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        return InternalError(f"malformed task: 'timeout' must be a positive number, got {timeout!r}")
    return None


@app.task(name=CALL_TOOL, bind=True, max_retries=None)
def call_tool(
    self: Task,
    tool: Any,
    arguments: Any = None,
    server: Any = None,
    timeout: Any = None,
    request_id: Any = None,
    idempotency_key: Any = None,
    attempt: Any = 1,
    deadline_at: Any = None,
    waits: Any = 0,
    progress: Any = False,
    enqueued_at: Any = None,
    **unknown: Any,
) -> dict[str, Any]:
    """Run one tool call; retries and waits re-enqueue this task, never sleep.

    ``attempt``, ``deadline_at`` and ``waits`` are set by the task itself when
    it re-enqueues: attempts made so far, the wall-clock limit for waiting on
    limits or an open breaker, and how many such waits happened.
    ``progress=True`` relays the server's progress to ``Keys.progress(task id)``.
    ``enqueued_at`` (epoch seconds, stamped by the producer and kept by every
    re-enqueue) gives the queue wait of the call's first start.
    The task id is also the id a caller cancels the call by.
    """
    started_at = time.time()
    request_id = str(request_id) if request_id else self.request.id
    problem = _check_call_shape(tool, arguments, server, timeout)
    if problem is None and unknown:
        problem = InternalError(f"malformed task: unknown fields {sorted(unknown)}")
    if problem is None and not (isinstance(attempt, int) and isinstance(waits, int)):
        problem = InternalError("malformed task: 'attempt' and 'waits' must be integers")
    if problem is None and not isinstance(progress, bool):
        problem = InternalError(f"malformed task: 'progress' must be true or false, got {progress!r}")
    if problem is None and (wrong := check_enqueued_at(enqueued_at)):
        problem = InternalError(f"malformed task: {wrong}")
    if problem is not None:
        failed = ToolResult.failure(str(tool), problem, request_id=request_id)
        metrics().attempt(failed, None)
        return failed.to_dict()
    try:
        manager = get_manager()
    except MCPError as exc:
        log.error("mcpq cannot start its manager: %s", exc.message)
        failed = ToolResult.failure(tool, exc, request_id=request_id)
        metrics().attempt(failed, None)
        return failed.to_dict()

    if not isinstance(deadline_at, int | float):
        deadline_at = time.time() + (timeout or manager.router.default_timeout(tool, server))
    call = dict(
        tool=tool, arguments=arguments, server=server, timeout=timeout, request_id=request_id,
        idempotency_key=idempotency_key, attempt=attempt, deadline_at=deadline_at, waits=waits,
    )  # fmt: skip
    if progress:  # only when asked: a message without it stays readable by older workers
        call["progress"] = True
    if enqueued_at is not None:  # kept as it was: the wait before the first start
        call["enqueued_at"] = enqueued_at

    def again(countdown: float, **changes: Any) -> Exception:
        """Re-enqueue this call (a new message), never sleeping on a slot."""
        kwargs = {**call, **changes}
        shown = _renew_ledger(manager, self.request.id, kwargs, _queue_of(self), countdown)
        retry: Exception = self.retry(kwargs=kwargs, countdown=countdown, argsrepr="()", kwargsrepr=shown)
        return retry

    start_sweeper(manager)
    # The claim names this attempt of this task: a redelivery of the same
    # message finds it; a retry (a new attempt) takes a new one.
    claim_key = f"{self.request.id}:{attempt}" if self.request.id else None
    queued(queue_wait(enqueued_at, started_at, attempt=attempt, waits=waits))  # the call span's queue wait
    try:
        result = manager.call_tool(
            tool,
            arguments,
            server=server,
            timeout=timeout,
            request_id=request_id,
            claim_key=claim_key,
            attempt=attempt,
            ledger_id=self.request.id,
            call_id=self.request.id,
            progress=progress,
        )
    except CallInProgress as busy:
        step: Again | None = when_busy(busy)
        metrics().attempt(None, step, tool=tool, server=server)
    else:
        step = next_step(manager.config, result, attempt=attempt, waits=waits, deadline_at=deadline_at)
        waited = queue_wait(enqueued_at, started_at, attempt=attempt, waits=waits)
        metrics().attempt(result, step, queue_wait=waited)
    if step is not None:
        raise again(step.countdown, **step.changes)
    return _final(manager, self, result)


def _final(manager: Any, task: Task, result: ToolResult) -> dict[str, Any]:
    """The call's one terminal result: make sure its ledger entry is gone."""
    if not result.details.pop(LEDGER_CLEARED, False) and task.request.id:
        try:
            manager.ledger.clear(task.request.id)
        except redis.RedisError as exc:  # the sweeper may publish it again; its claim answers
            log.warning("could not clear call %s from the ledger: %s", task.request.id, exc)
    return result.to_dict()


def _queue_of(task: Task) -> str:
    info = task.request.delivery_info or {}
    return str(info.get("routing_key") or task.app.conf.task_default_queue)


# --------------------------------------------------------------------------- chunks

_runtime_lock = threading.Lock()
_writer: tuple[int, ResultWriter] | None = None
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _chunk_writer() -> ResultWriter:
    """This process's writer of chunk results (made after any fork)."""
    global _writer
    with _runtime_lock:
        if _writer is None or _writer[0] != os.getpid():
            _writer = (os.getpid(), ResultWriter(app))
        return _writer[1]


def _chunk_pool(size: int) -> ThreadPoolExecutor:
    """This process's threads for the calls of chunk tasks (made after any fork)."""
    global _pool
    with _runtime_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(size, thread_name_prefix="mcpq-chunk"))
        return _pool[1]


@app.task(name=CALL_CHUNK, bind=True, ignore_result=True)
def call_chunk(self: Task, calls: Any = None, **unknown: Any) -> dict[str, Any]:
    """Run a chunk's calls at once over this process's pooled sessions.

    Each call is what it would be as its own ``mcpq.call_tool`` task: its own
    execution claim (``<call id>:<attempt>``), breaker accounting, limits and
    validation, and its ToolResult stored under the call's id, where the
    producer waits for it. A call that must wait or retry leaves the chunk as
    an ``mcpq.call_tool`` message with the call's id, so its later attempts
    are single calls. A redelivered chunk re-runs only the calls whose claims
    hold no result; the others are answered from their claims.
    """
    if not isinstance(calls, list) or unknown:
        log.error(
            "malformed chunk %s: 'calls' must be a list%s",
            self.request.id,
            " (unknown fields)" * bool(unknown),
        )
        return {"ok": False, "error": "malformed chunk"}
    problem: MCPError | None = None
    manager: MCPClientManager | None = None
    if len(calls) > MAX_CHUNK_CALLS:
        problem = InternalError(f"malformed chunk: {len(calls)} calls, more than {MAX_CHUNK_CALLS}")
    else:
        try:
            manager = get_manager()
        except MCPError as exc:
            log.error("mcpq cannot start its manager: %s", exc.message)
            problem = InternalError("mcpq could not start on this worker")
    writer = _chunk_writer()
    if manager is None:
        outcomes = [_store_failure(writer, entry, problem or InternalError("no manager")) for entry in calls]
    else:
        start_sweeper(manager)
        pool, queue = _chunk_pool(manager.settings.chunk_concurrency), _queue_of(self)
        # chunk_call: each call its own trace (or its submit's), linked to this chunk's span.
        futures = [
            pool.submit(chunk_call(_run_chunk_call, entry), manager, writer, entry, queue) for entry in calls
        ]
        outcomes = [future.result() for future in futures]
        if self.request.id:
            # The chunk's calls were also known by their own ids (Ledger.knows):
            # each has its result now, or its own entry once re-enqueued.
            members = [e["id"] for e in calls if isinstance(e, dict) and isinstance(e.get("id"), str)]
            try:
                manager.ledger.clear(self.request.id, members=members)
            except redis.RedisError as exc:  # a republished chunk is answered from its claims
                log.warning("could not clear chunk %s from the ledger: %s", self.request.id, exc)
    counts = Counter(outcomes)
    return {"ok": True, "calls": len(calls), **dict(sorted(counts.items()))}


def _run_chunk_call(manager: MCPClientManager, writer: ResultWriter, entry: Any, queue: str) -> str:
    """One call of a chunk, start to its final result or hand-off; never raises."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        log.error("malformed call in a chunk (no id): dropped")
        return "malformed"
    started_at = time.time()
    call_id: str = entry["id"]
    tool: Any = entry.get("tool")
    arguments, server, timeout = entry.get("arguments"), entry.get("server"), entry.get("timeout")
    progress, enqueued_at = entry.get("progress", False), entry.get("enqueued_at")
    problem = _check_call_shape(tool, arguments, server, timeout)
    if problem is None and not isinstance(progress, bool):
        problem = InternalError(f"malformed call: 'progress' must be true or false, got {progress!r}")
    if problem is None and (wrong := check_enqueued_at(enqueued_at)):
        problem = InternalError(f"malformed call: {wrong}")
    if problem is None and set(entry) - _CHUNK_CALL_FIELDS:
        problem = InternalError(f"malformed call: unknown fields {sorted(set(entry) - _CHUNK_CALL_FIELDS)}")
    if problem is not None:
        return _store_failure(writer, entry, problem)
    try:
        deadline_at = time.time() + (timeout or manager.router.default_timeout(tool, server))
        try:
            result = manager.call_tool(
                tool, arguments, server=server, timeout=timeout,
                request_id=call_id, claim_key=f"{call_id}:1", attempt=1,
                call_id=call_id, progress=progress,
            )  # fmt: skip
        except CallInProgress as busy:
            step: Again | None = when_busy(busy)
            metrics().attempt(None, step, tool=tool, server=server)
        else:
            step = next_step(manager.config, result, attempt=1, waits=0, deadline_at=deadline_at)
            waited = queue_wait(enqueued_at, started_at, attempt=1, waits=0)
            metrics().attempt(result, step, queue_wait=waited)
        if step is not None:
            kwargs = {
                "tool": tool, "arguments": arguments, "server": server, "timeout": timeout,
                "request_id": call_id, "attempt": 1, "deadline_at": deadline_at, "waits": 0,
                **({"progress": True} if progress else {}),
                **({"enqueued_at": enqueued_at} if enqueued_at is not None else {}), **step.changes,
            }  # fmt: skip
            _requeue(manager, call_id, kwargs, step.countdown, queue)
            return "requeued"
        writer.store(call_id, result.to_dict())
        return "succeeded" if result.success else "failed"
    except Exception as exc:  # one call must not take the chunk's other calls down
        log.exception("chunk call %s failed inside mcpq", call_id)
        return _store_failure(
            writer, entry, InternalError(f"mcpq failed while calling {tool!r}: {type(exc).__name__}: {exc}")
        )


#: ``trace``: the trace context of the call's submit span (read by worker/tracing.py ``chunk_call``).
_CHUNK_CALL_FIELDS = frozenset(
    {"id", "tool", "arguments", "server", "timeout", "progress", "enqueued_at", "trace"}
)


def _store_failure(writer: ResultWriter, entry: Any, error: MCPError) -> str:
    call_id = entry.get("id") if isinstance(entry, dict) else None
    if not isinstance(call_id, str) or not call_id:
        return "malformed"
    tool = entry.get("tool")
    result = ToolResult.failure(tool if isinstance(tool, str) else "?", error, request_id=call_id)
    metrics().attempt(result, None)
    try:
        writer.store(call_id, result.to_dict())
    except Exception:  # the producer's stall timeout reports it then
        log.exception("could not store the result of call %s", call_id)
    return "failed"


def _requeue(
    manager: MCPClientManager, call_id: str, kwargs: dict[str, Any], countdown: float, queue: str
) -> None:
    """Send a chunk's call on as its own ``mcpq.call_tool`` task (recorded in the ledger first)."""
    shown = _renew_ledger(manager, call_id, kwargs, queue, countdown)
    app.send_task(
        CALL_TOOL, kwargs=kwargs, task_id=call_id, countdown=countdown, queue=queue,
        argsrepr="()", kwargsrepr=shown,
    )  # fmt: skip


def _renew_ledger(
    manager: MCPClientManager, task_id: str | None, kwargs: dict[str, Any], queue: str, countdown: float
) -> str:
    """Before a call is re-enqueued: renew its ledger entry (so a lost
    re-enqueue is published again too) and return the secret-free description
    the producer gave its first message (Celery would show the raw arguments)."""
    server, tool = kwargs.get("server"), str(kwargs["tool"])
    label = f"{server}/{tool}" if server else tool
    shown = describe_call(label, kwargs.get("arguments") or {}, manager.settings.secret_pattern_list())
    if task_id:
        with contextlib.suppress(redis.RedisError):
            # The current (run) span's context: a lost re-enqueue, republished, stays in the trace.
            entry = ledger_message(kwargs, queue, shown, trace=tracing.carrier())
            manager.ledger.record([(task_id, entry)], extra_grace=countdown)
    return shown


_sweeper_lock = threading.Lock()


def start_sweeper(manager: Any) -> None:
    if manager.sweeper is not None:
        return

    def publish(task_id: str, message: dict[str, Any]) -> None:
        name = message.get("task", CALL_TOOL)
        if name not in (CALL_TOOL, CALL_CHUNK):  # the ledger lives in Redis: trust no name
            log.error("ledger entry %s names task %r; dropped", task_id, name)
            return
        # The first publish's trace, current again: Celery's publish span and the
        # message's headers continue it (a chunk's entries carry their own).
        with tracing.attached(tracing.checked_carrier(message.get("trace"))):
            app.send_task(
                name,
                kwargs=message["kwargs"],
                task_id=task_id,
                queue=message["queue"],
                argsrepr="()",
                kwargsrepr=message.get("kwargsrepr") or "(hidden)",
            )

    with _sweeper_lock:
        manager.start_sweeper(publish)


def _admin(op: str, fn: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "result": fn(get_manager())}
    except MCPError as exc:
        return {"ok": False, "error": exc.message, "error_code": exc.code.value}


@app.task(name=DISCOVER)
def discover(server: str | None = None) -> dict[str, Any]:
    return _admin("discover", lambda m: m.discover(server))


@app.task(name=HEALTH)
def health(server: str | None = None) -> dict[str, Any]:
    return _admin("health", lambda m: m.health(server))


@app.task(name=RECONNECT)
def reconnect(server: str) -> dict[str, Any]:
    return _admin("reconnect", lambda m: m.reconnect(server))
