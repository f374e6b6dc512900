"""mcpq: run MCP tool calls as Celery tasks.

    from mcpq import ToolQueue
    q = ToolQueue.from_env()
    result = q.call("get-sum", {"a": 2, "b": 40}, timeout=30)

This file is the package's public API. The repository's folders ``worker/``
and ``producer/`` install as ``mcpq.worker`` and ``mcpq.producer``. Importing
``mcpq`` never imports the MCP SDK.
"""

from mcpq.producer import (
    AmbiguousToolError,
    CallHandle,
    CircuitOpenError,
    ErrorCode,
    InvalidArgumentsError,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    ServerDisabledError,
    ServerNotFoundError,
    ToolExecutionError,
    ToolNotFoundError,
    ToolQueue,
    ToolResult,
)

__all__ = [
    "AmbiguousToolError",
    "CallHandle",
    "CircuitOpenError",
    "ErrorCode",
    "InvalidArgumentsError",
    "MCPConnectionError",
    "MCPError",
    "MCPTimeoutError",
    "ServerDisabledError",
    "ServerNotFoundError",
    "ToolExecutionError",
    "ToolNotFoundError",
    "ToolQueue",
    "ToolResult",
]
