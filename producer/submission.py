"""The rules of submitting one call, shared by both faces (``ToolQueue`` and
``AsyncToolQueue``): validation, task kwargs, the label, the wait hint, the
secret-free description, the ledger entry and the idempotency key check.

Nothing here publishes: :mod:`mcpq.producer.sending` does that, so the sync
face can call it inline and the asyncio face on its publisher thread.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from mcpq.producer.publish_policy import RESULT_GRACE
from mcpq.worker.contract import tracing
from mcpq.worker.contract.arguments import check_arguments
from mcpq.worker.contract.errors import InvalidArgumentsError, MCPConnectionError, MCPTimeoutError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.numbers import seconds
from mcpq.worker.contract.redact import describe_call
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import is_unreachable, unreachable_error

#: Task kwargs a ``mcpq.call_chunk`` entry may carry besides ``id`` (worker/tasks.py).
CHUNK_ENTRY_FIELDS = frozenset({"tool", "arguments", "server", "timeout", "progress", "enqueued_at"})


def checked_seconds(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as seconds, or InvalidArgumentsError naming ``name``."""
    try:
        return seconds(value, name, allow_zero=allow_zero)
    except ValueError as exc:
        raise InvalidArgumentsError(str(exc), details={"field": name}) from None


def call_label(tool: str, server: str | None) -> str:
    """How results name a call: ``server/tool``, or ``tool`` when no server is named."""
    return tool if server is None else f"{server}/{tool}"


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """One call, checked and ready to publish (as a single task or a chunk entry)."""

    task_id: str
    tool: str
    arguments: dict[str, Any]
    server: str | None
    label: str
    #: The ``mcpq.call_tool`` kwargs.
    kwargs: dict[str, Any]
    queue: str
    #: The call described with secret values masked (Flower, logs, the ledger).
    shown: str
    #: How long ``call`` waits for the result by default: the deadline plus grace.
    wait_hint: float
    idempotency_key: str | None
    progress: bool
    #: The submit span's trace context (``traceparent``, ...) when tracing is on:
    #: current again around the publish on another thread, a chunk entry's ``trace``.
    trace: dict[str, str] | None = None

    @property
    def ledger_entry(self) -> tuple[str, dict[str, Any]]:
        """``(task id, ledger message)`` of the call sent as one ``mcpq.call_tool``."""
        return self.task_id, ledger_message(self.kwargs, self.queue, self.shown, trace=self.trace)

    @property
    def chunkable(self) -> bool:
        """Whether the call can go out as a ``mcpq.call_chunk`` entry (it carries
        nothing a chunk entry cannot; ``request_id`` is its id anyway)."""
        return all(k in CHUNK_ENTRY_FIELDS or k == "request_id" for k in self.kwargs)

    def chunk_entry(self) -> dict[str, Any]:
        """The call as an entry of a ``mcpq.call_chunk`` task."""
        entry = {"id": self.task_id, **{k: v for k, v in self.kwargs.items() if k in CHUNK_ENTRY_FIELDS}}
        if self.trace:
            entry["trace"] = self.trace
        return entry


def prepare_call(
    settings: Settings,
    tool: str,
    arguments: dict[str, Any] | None,
    *,
    server: str | None = None,
    timeout: float | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    queue: str | None = None,
    progress: bool = False,
    traced: bool = False,
) -> PreparedCall:
    """Check one call and build what publishing it needs.

    :param settings: default queue and timeout, secret patterns.
    :param tool: the tool's name, or ``server/tool``.
    :param arguments: the tool's arguments (JSON the SDK can send).
    :param server: the server to call, else the tool's name routes it.
    :param timeout: the call's deadline on the worker, seconds.
    :param request_id: the task id to use (default: a new UUID).
    :param idempotency_key: checked later by :func:`claim_idempotency_key`.
    :param queue: the Celery queue, overriding ``settings.queue``.
    :param progress: ask the worker to relay the server's progress.
    :param traced: called inside a ``submit`` span (``tracing.submit_span``):
        the call carries that trace. Fan-out leaves it off: each of its calls
        is traced on its own, linked to its chunk.
    :raises InvalidArgumentsError: arguments that cannot be sent, a timeout
        that is not a positive finite number of seconds.
    """
    check_arguments(arguments, tool)
    if timeout is not None:
        timeout = checked_seconds(timeout, "timeout")
    task_id = request_id or str(uuid.uuid4())
    args = arguments or {}
    kwargs: dict[str, Any] = {"tool": tool, "arguments": args}
    if server is not None:
        kwargs["server"] = server
    if timeout is not None:
        kwargs["timeout"] = timeout
    if request_id is not None:
        kwargs["request_id"] = request_id
    if idempotency_key is not None:
        kwargs["idempotency_key"] = idempotency_key
    if progress:
        # Only when asked: older workers reject the field, and without it the
        # worker sends no progress traffic at all.
        kwargs["progress"] = True
    # When the call was enqueued (epoch seconds): the worker's queue-wait metric.
    kwargs["enqueued_at"] = time.time()
    label = call_label(tool, server)
    wait_hint = (timeout if timeout is not None else settings.default_timeout) + RESULT_GRACE
    return PreparedCall(
        task_id=task_id,
        tool=tool,
        arguments=args,
        server=server,
        label=label,
        kwargs=kwargs,
        queue=queue or settings.queue,
        shown=describe_call(label, args, settings.secret_pattern_list()),
        wait_hint=wait_hint,
        idempotency_key=idempotency_key,
        progress=progress,
        trace=_traced(task_id) if traced else None,
    )


def _traced(task_id: str) -> dict[str, str] | None:
    """Name the call on the current (submit) span; its trace context, or None when tracing is off."""
    tracing.note("mcpq.call_id", task_id)
    return tracing.carrier()


def claim_idempotency_key(
    client: redis.Redis, keys: Keys, settings: Settings, call: PreparedCall
) -> str | None:
    """Record ``call`` as the call for its idempotency key; return the earlier
    call's task id if the key is already taken (SET NX: exactly one submit
    wins a race), or None when this call is the first (or has no key).

    :raises InvalidArgumentsError: the key was used for a different call.
    :raises MCPConnectionError: the state Redis could not be asked.
    """
    key = call.idempotency_key
    if key is None:
        return None
    fingerprint = json.dumps([call.tool, call.server, call.arguments], sort_keys=True, default=str)
    doc = json.dumps({"task_id": call.task_id, "call": fingerprint})
    window_ms = int(settings.idempotency_window * 1000)
    name = f"{keys.idempotency}{key}"
    while True:
        try:
            if client.set(name, doc, nx=True, px=window_ms):
                return None
            raw = client.get(name)
        except redis.RedisError as exc:
            raise MCPConnectionError(f"cannot check idempotency key {key!r} in Redis: {exc}") from None
        if raw is not None:
            break
        # Expired between SET and GET: this submit starts a new window.
    earlier = json.loads(raw)  # type: ignore[arg-type]
    if earlier.get("call") != fingerprint:
        raise InvalidArgumentsError(
            f"idempotency key {key!r} was already used for a different call "
            "(another tool, server or arguments); use a new key",
            details={"idempotency_key": key, "task_id": earlier.get("task_id")},
        )
    return str(earlier["task_id"])


def not_enqueued_result(label: str, exc: Exception, request_id: str | None, broker_url: str) -> ToolResult:
    """What ``call`` returns when ``submit`` raised ``exc``: a failed result for
    a failure to enqueue (``connection_error`` for an unreachable broker or
    Redis, ``invalid_arguments``); any other exception is raised again (a bug)."""
    if isinstance(exc, MCPConnectionError | InvalidArgumentsError):
        return ToolResult.failure(label, exc, request_id=request_id)
    # submit already turns an unreachable broker into MCPConnectionError; a
    # lost connection that still escapes it (wrapped by a library) is the
    # same failure to enqueue, not a bug to raise.
    if not is_unreachable(exc):
        raise exc
    return ToolResult.failure(
        label, unreachable_error("broker_or_backend", broker_url, exc), request_id=request_id
    )


def timed_out_result(label: str, exc: MCPTimeoutError, request_id: str | None, task_id: str) -> ToolResult:
    """What ``call`` returns when no result came within its wait: the task id
    lets the caller (and the HTTP API's Location header) find the call later;
    an explicit ``request_id`` stays as the caller gave it."""
    return ToolResult.failure(label, exc, request_id=request_id if request_id is not None else task_id)
