"""The Celery tasks: thin wrappers over MCPClientManager.

Each validates the shape of its message (a task message is input like any
other) and always returns a JSON-safe dict; an ``mcpq.call_tool`` always
returns a ToolResult dict, never raises.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Any

import redis
from celery import Task

from worker.celery import app
from worker.claims import CallInProgress
from worker.errors import ErrorCode, InternalError, InvalidArgumentsError, MCPError
from worker.manager import get_manager
from worker.redact import describe_call
from worker.result import ToolResult
from worker.router import LEDGER_CLEARED
from worker.task_names import CALL_TOOL, DISCOVER, HEALTH, RECONNECT

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


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter for the retry after ``attempt``."""
    return float(min(cap, base * 2.0 ** (attempt - 1))) * random.uniform(0.5, 1.0)


def _wait_countdown(result: ToolResult, waits: int) -> float:
    """How long to stay off a worker slot before asking again (limits, open breakers)."""
    hinted = float(result.details.get("retry_after") or 0.0)
    fallback = min(1.0, 0.05 * 2 ** min(waits, 5)) * random.uniform(0.5, 1.5)
    return float(max(hinted, 0.0) or fallback)


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
    **unknown: Any,
) -> dict[str, Any]:
    """Run one tool call; retries and waits re-enqueue this task, never sleep.

    ``attempt``, ``deadline_at`` and ``waits`` are set by the task itself when
    it re-enqueues: attempts made so far, the wall-clock limit for waiting on
    limits or an open breaker, and how many such waits happened.
    """
    request_id = str(request_id) if request_id else self.request.id
    problem = _check_call_shape(tool, arguments, server, timeout)
    if problem is None and unknown:
        problem = InternalError(f"malformed task: unknown fields {sorted(unknown)}")
    if problem is None and not (isinstance(attempt, int) and isinstance(waits, int)):
        problem = InternalError("malformed task: 'attempt' and 'waits' must be integers")
    if problem is not None:
        return ToolResult.failure(str(tool), problem, request_id=request_id).to_dict()
    try:
        manager = get_manager()
    except MCPError as exc:
        log.error("mcpq cannot start its manager: %s", exc.message)
        return ToolResult.failure(tool, exc, request_id=request_id).to_dict()

    if not isinstance(deadline_at, int | float):
        deadline_at = time.time() + (timeout or manager.router.default_timeout(tool, server))
    call = dict(
        tool=tool, arguments=arguments, server=server, timeout=timeout, request_id=request_id,
        idempotency_key=idempotency_key, attempt=attempt, deadline_at=deadline_at, waits=waits,
    )  # fmt: skip

    def again(countdown: float, **changes: Any) -> Exception:
        """Re-enqueue this call (a new message), never sleeping on a slot.
        The new message gets the same redacted description the producer gave
        the first one: Celery would otherwise show the raw arguments. Its
        ledger entry is renewed, so a lost re-enqueue is published again too."""
        label = f"{server}/{tool}" if server else tool
        shown = describe_call(label, arguments or {}, manager.settings.secret_pattern_list())
        if self.request.id:
            message = {"kwargs": {**call, **changes}, "queue": _queue_of(self), "kwargsrepr": shown}
            with contextlib.suppress(redis.RedisError):
                manager.ledger.record([(self.request.id, message)], extra_grace=countdown)
        retry: Exception = self.retry(
            kwargs={**call, **changes}, countdown=countdown, argsrepr="()", kwargsrepr=shown
        )
        return retry

    start_sweeper(manager)
    # The claim names this attempt of this task: a redelivery of the same
    # message finds it; a retry (a new attempt) takes a new one.
    claim_key = f"{self.request.id}:{attempt}" if self.request.id else None
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
        )
    except CallInProgress as busy:
        # A duplicate delivery while the first is still running: wait for it
        # off-slot; the claim then holds the one result, or shows its owner died.
        raise again(max(min(busy.retry_after, 5.0), 0.2)) from None

    if result.error_code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.CIRCUIT_OPEN):
        wants_wait = result.error_code == ErrorCode.LIMIT_EXCEEDED or result.details.get("defer")
        countdown = _wait_countdown(result, waits)
        if wants_wait and time.time() + countdown < deadline_at:
            raise again(countdown, waits=waits + 1)
        if wants_wait:
            result.error = f"{result.error}; gave up waiting at the call's deadline"
        return _final(manager, self, result)

    if not result.success and result.details.get("retry_safe") and result.server_name:
        policy = manager.config.mcp_servers[result.server_name]
        if attempt <= policy.retry_attempts:
            countdown = backoff(attempt, policy.retry_delay, policy.retry_max_delay)
            total = policy.retry_attempts + 1
            log.info(
                "call %s to %r failed (%s); attempt %d of %d in %.2fs",
                request_id, result.server_name, result.error_code, attempt + 1, total, countdown,
            )  # fmt: skip
            raise again(countdown, attempt=attempt + 1, deadline_at=None)
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


_sweeper_lock = threading.Lock()


def start_sweeper(manager: Any) -> None:
    if manager.sweeper is not None:
        return

    def publish(task_id: str, message: dict[str, Any]) -> None:
        app.send_task(
            CALL_TOOL,
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
