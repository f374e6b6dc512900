"""The Celery tasks: thin wrappers over MCPClientManager.

Each validates the shape of its message (a task message is input like any
other) and always returns a JSON-safe dict; an ``mcpq.call_tool`` always
returns a ToolResult dict, never raises.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from worker.celery import app
from worker.errors import InternalError, InvalidArgumentsError, MCPError
from worker.manager import get_manager
from worker.result import ToolResult
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


@app.task(name=CALL_TOOL, bind=True)
def call_tool(
    self: Task,
    tool: Any,
    arguments: Any = None,
    server: Any = None,
    timeout: Any = None,
    request_id: Any = None,
    idempotency_key: Any = None,
    **unknown: Any,
) -> dict[str, Any]:
    request_id = str(request_id) if request_id else self.request.id
    problem = _check_call_shape(tool, arguments, server, timeout)
    if problem is None and unknown:
        problem = InternalError(f"malformed task: unknown fields {sorted(unknown)}")
    if problem is not None:
        return ToolResult.failure(str(tool), problem, request_id=request_id).to_dict()
    try:
        manager = get_manager()
    except MCPError as exc:
        log.error("mcpq cannot start its manager: %s", exc.message)
        return ToolResult.failure(tool, exc, request_id=request_id).to_dict()
    result = manager.call_tool(tool, arguments, server=server, timeout=timeout, request_id=request_id)
    return result.to_dict()


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
