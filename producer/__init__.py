"""mcpq producer: enqueue MCP tool calls from apps, the CLI and the HTTP API.

    from mcpq.producer import ToolQueue
    q = ToolQueue.from_env()
    result = q.call("get-sum", {"a": 2, "b": 40}, timeout=30)

Importing this package never imports the MCP SDK.
"""

from mcpq.producer.queue import CallHandle, ToolQueue
from mcpq.worker.contract.errors import (
    AmbiguousToolError,
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
)
from mcpq.worker.contract.result import ToolResult

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
