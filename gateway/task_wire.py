"""The Tasks extension's wire shapes (``io.modelcontextprotocol/tasks``, SEP-2663) and mcpq's mapping to them.

Shapes as the extension's schema defines them (experimental-ext-tasks
``schema/draft/schema.ts``; the conformance suite's ``tasks-*`` scenarios
check the same): a flat ``Result & Task`` with ``taskId``, ``status``
(``working`` | ``input_required`` | ``completed`` | ``failed`` |
``cancelled``), ``statusMessage``, ``createdAt`` / ``lastUpdatedAt`` (ISO
8601), ``ttlMs`` and ``pollIntervalMs`` (integer milliseconds). A
``tools/call`` answered with a task carries ``resultType: "task"``;
``tasks/get`` answers ``resultType: "complete"`` with the final ``result``
(a ``CallToolResult``) or ``error`` (a JSON-RPC error) inlined.

``mcp_types`` has only the 2025-11-25 Task types (``ttl``, ``pollInterval``,
a nested ``task``), which this revision renamed and flattened; hence these.

The task id is the mcpq call id. The gateway keeps no state, so what a task
reports comes from the call's id and its ToolResult: ids are UUIDv7-shaped
(:func:`new_call_id`), whose first 48 bits are the creation time in
milliseconds, so any gateway process can tell ``createdAt``.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any, Literal

from mcp.shared.exceptions import MCPError as ProtocolLevelError
from mcp_types import RequestParams, Result
from pydantic import Field

from mcpq.gateway.results import to_mcp
from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.result import ToolResult

EXTENSION = "io.modelcontextprotocol/tasks"
#: ``resultType`` of a tools/call answered with a task (reserved by the extension).
TASK_RESULT_TYPE = "task"

TaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]


class TaskIdParams(RequestParams):
    """Params of ``tasks/get`` and ``tasks/cancel``."""

    task_id: str = Field(min_length=1)


class UpdateTaskParams(TaskIdParams):
    """Params of ``tasks/update`` (the gateway never asks for input, so there is nothing to answer)."""

    input_responses: dict[str, Any] = Field(default_factory=dict)


class TaskResult(Result):
    """A task on the wire: ``CreateTaskResult`` (``resultType: "task"``) or ``GetTaskResult``
    (``"complete"``, with ``result`` or ``error`` once terminal). Fields left None are not sent."""

    result_type: str = "complete"
    task_id: str
    status: TaskStatus
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def new_call_id(now_ms: int | None = None) -> str:
    """A new call id: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds then 74 random bits.

    :param now_ms: the creation time (default: now).
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # the RFC variant
    return str(uuid.UUID(int=value))


def created_at(call_id: str) -> dt.datetime | None:
    """When call ``call_id`` was created, if its id says so (a UUIDv7), else None."""
    try:
        parsed = uuid.UUID(call_id)
    except ValueError:
        return None
    if parsed.version != 7:
        return None
    return dt.datetime.fromtimestamp((parsed.int >> 80) / 1000, tz=dt.UTC)


def iso(moment: dt.datetime) -> str:
    """``moment`` as the spec's examples write it: ``2025-11-25T10:30:00.000Z``."""
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def created_task(call_id: str, *, ttl_ms: int, poll_interval_ms: int, now: dt.datetime) -> TaskResult:
    """The ``CreateTaskResult`` for a call handed back as a task (still running).

    :param call_id: the mcpq call id, which is the task id.
    :param ttl_ms: how long the task can be read, from its creation.
    :param poll_interval_ms: how often the client should poll.
    :param now: the time (when the id carries none).
    """
    created = created_at(call_id) or now
    return TaskResult(
        result_type=TASK_RESULT_TYPE,
        task_id=call_id,
        status="working",
        status_message="the call is queued or running; poll tasks/get for its result",
        created_at=iso(created),
        last_updated_at=iso(created),
        ttl_ms=ttl_ms,
        poll_interval_ms=poll_interval_ms,
    )


def detailed_task(
    call_id: str,
    result: ToolResult | None,
    *,
    ttl_ms: int,
    poll_interval_ms: int,
    now: dt.datetime,
    message: str | None = None,
) -> TaskResult:
    """The ``tasks/get`` answer for call ``call_id``.

    - No result yet (queued, started, retrying): ``working``, with the latest
      progress message as ``statusMessage``.
    - Cancelled (mcpq's ``cancelled``): ``cancelled``.
    - A result the sync ``tools/call`` answers with a JSON-RPC error (``to_mcp``
      raises): ``failed`` with that ``error``.
    - Any other result, ``isError`` ones included: ``completed`` with the
      ``CallToolResult`` the sync call would have returned.

    :param call_id: the task id.
    :param result: the call's ToolResult, or None while it runs.
    :param ttl_ms: how long the task can be read, from its creation.
    :param poll_interval_ms: how often the client should poll.
    :param now: the time (when the id carries none, and as a bound).
    :param message: the call's latest progress message, if any.
    """
    created = created_at(call_id) or now
    fields: dict[str, Any] = {
        "task_id": call_id,
        "created_at": iso(created),
        "ttl_ms": ttl_ms,
        "poll_interval_ms": poll_interval_ms,
    }
    if result is None:
        return TaskResult(status="working", status_message=message, last_updated_at=iso(created), **fields)
    # The result backend keeps no end time the gateway can read: the run time bounds it from below.
    ended = iso(min(now, max(created, created + dt.timedelta(milliseconds=result.execution_time_ms))))
    if result.error_code == ErrorCode.CANCELLED:
        return TaskResult(status="cancelled", status_message=result.error, last_updated_at=ended, **fields)
    try:
        answer = to_mcp(result)
    except ProtocolLevelError as exc:
        error = exc.error.model_dump(by_alias=True, mode="json", exclude_none=True)
        return TaskResult(
            status="failed", status_message=exc.error.message, error=error, last_updated_at=ended, **fields
        )
    return TaskResult(
        status="completed",
        result=answer.model_dump(by_alias=True, mode="json", exclude_none=True),
        last_updated_at=ended,
        **fields,
    )
