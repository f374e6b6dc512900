"""mcpq producer: enqueue MCP tool calls from apps, the CLI and the HTTP API.

    from mcpq.producer import ToolQueue
    q = ToolQueue.from_env()
    result = q.call("get-sum", {"a": 2, "b": 40}, timeout=30)

Importing this package never imports the MCP SDK.
"""

from mcpq.producer.aio import AsyncCallHandle, AsyncToolQueue
from mcpq.producer.aio_fanout import AsyncFanOutHandle
from mcpq.producer.cancelling import CancelOutcome
from mcpq.producer.events import CallEvent, ProgressEvent, ResultEvent, StatusEvent
from mcpq.producer.queue import CallHandle, ToolQueue
from mcpq.worker.contract.errors import (
    AmbiguousToolError,
    CallCancelledError,
    CallNotFoundError,
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
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult

__all__ = [
    "AmbiguousToolError",
    "AsyncCallHandle",
    "AsyncFanOutHandle",
    "AsyncToolQueue",
    "CallCancelledError",
    "CallEvent",
    "CallHandle",
    "CallNotFoundError",
    "CancelOutcome",
    "CircuitOpenError",
    "ErrorCode",
    "InvalidArgumentsError",
    "MCPConnectionError",
    "MCPError",
    "MCPTimeoutError",
    "ProgressEvent",
    "ProgressUpdate",
    "ResultEvent",
    "ServerDisabledError",
    "ServerNotFoundError",
    "StatusEvent",
    "ToolExecutionError",
    "ToolNotFoundError",
    "ToolQueue",
    "ToolResult",
]
