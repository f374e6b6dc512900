"""Stable error codes and the exception classes Python callers get.

The codes are a public contract (ToolResult.error_code, HTTP API bodies, CLI
exit reasons): add new ones, never rename or reuse them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    TOOL_NOT_FOUND = "tool_not_found"
    AMBIGUOUS_TOOL = "ambiguous_tool"
    SERVER_NOT_FOUND = "server_not_found"
    SERVER_DISABLED = "server_disabled"
    INVALID_ARGUMENTS = "invalid_arguments"
    TOOL_ERROR = "tool_error"
    CIRCUIT_OPEN = "circuit_open"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    PROTOCOL_ERROR = "protocol_error"
    RESULT_TOO_LARGE = "result_too_large"
    OUTCOME_UNKNOWN = "outcome_unknown"
    INTERNAL_ERROR = "internal_error"
    CONFIG_ERROR = "config_error"
    LIMIT_EXCEEDED = "limit_exceeded"
    CANCELLED = "cancelled"
    CALL_NOT_FOUND = "call_not_found"


#: One line per code, for docs, ``mcpq --help`` and the HTTP API.
ERROR_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.TOOL_NOT_FOUND: "No enabled server offers a tool of that name.",
    ErrorCode.AMBIGUOUS_TOOL: "Several servers offer the tool; name one with server= or 'server/tool'.",
    ErrorCode.SERVER_NOT_FOUND: "No server of that name is configured.",
    ErrorCode.SERVER_DISABLED: "The server is configured with enabled: false.",
    ErrorCode.INVALID_ARGUMENTS: "The arguments fail the tool's inputSchema; nothing was sent.",
    ErrorCode.TOOL_ERROR: "The tool ran and reported an error (isError: true); its content is in data.",
    ErrorCode.CIRCUIT_OPEN: "The server's circuit breaker is open; the call was not sent.",
    ErrorCode.TIMEOUT: "The call's deadline passed before the server answered.",
    ErrorCode.CONNECTION_ERROR: "The server could not be reached or the connection broke.",
    ErrorCode.PROTOCOL_ERROR: "The server answered with something that is not valid MCP.",
    ErrorCode.RESULT_TOO_LARGE: "The tool's result is larger than max_result_bytes.",
    ErrorCode.OUTCOME_UNKNOWN: "The call may or may not have run; it was not repeated.",
    ErrorCode.INTERNAL_ERROR: "mcpq itself failed; the message says where.",
    ErrorCode.CONFIG_ERROR: "The configuration file or environment is invalid.",
    ErrorCode.LIMIT_EXCEEDED: "The server's max_concurrency or rate_limit held the call until its deadline.",
    ErrorCode.CANCELLED: "A caller cancelled the call; details.may_have_run says if it reached the server.",
    ErrorCode.CALL_NOT_FOUND: "No call with that id is known (never submitted, or its result expired).",
}


class MCPError(Exception):
    """Base of every mcpq error; ``code`` is one of :class:`ErrorCode`."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.code.value, self.message, self.details))


class ToolNotFoundError(MCPError):
    code = ErrorCode.TOOL_NOT_FOUND


class AmbiguousToolError(MCPError):
    code = ErrorCode.AMBIGUOUS_TOOL


class ServerNotFoundError(MCPError):
    code = ErrorCode.SERVER_NOT_FOUND


class ServerDisabledError(MCPError):
    code = ErrorCode.SERVER_DISABLED


class InvalidArgumentsError(MCPError):
    code = ErrorCode.INVALID_ARGUMENTS


class ToolExecutionError(MCPError):
    code = ErrorCode.TOOL_ERROR


class CircuitOpenError(MCPError):
    code = ErrorCode.CIRCUIT_OPEN


class MCPTimeoutError(MCPError):
    code = ErrorCode.TIMEOUT


class MCPConnectionError(MCPError):
    code = ErrorCode.CONNECTION_ERROR


class ProtocolError(MCPError):
    code = ErrorCode.PROTOCOL_ERROR


class ResultTooLargeError(MCPError):
    code = ErrorCode.RESULT_TOO_LARGE


class OutcomeUnknownError(MCPError):
    code = ErrorCode.OUTCOME_UNKNOWN


class InternalError(MCPError):
    code = ErrorCode.INTERNAL_ERROR


class ConfigError(MCPError):
    code = ErrorCode.CONFIG_ERROR


class LimitExceededError(MCPError):
    code = ErrorCode.LIMIT_EXCEEDED


class CallCancelledError(MCPError):
    code = ErrorCode.CANCELLED


class CallNotFoundError(MCPError):
    code = ErrorCode.CALL_NOT_FOUND


_BY_CODE: dict[str, type[MCPError]] = {
    cls.code.value: cls
    for cls in (
        ToolNotFoundError,
        AmbiguousToolError,
        ServerNotFoundError,
        ServerDisabledError,
        InvalidArgumentsError,
        ToolExecutionError,
        CircuitOpenError,
        MCPTimeoutError,
        MCPConnectionError,
        ProtocolError,
        ResultTooLargeError,
        OutcomeUnknownError,
        InternalError,
        ConfigError,
        LimitExceededError,
        CallCancelledError,
        CallNotFoundError,
    )
}


def error_class(code: str) -> type[MCPError]:
    """The exception class for an error code; unknown codes map to InternalError."""
    return _BY_CODE.get(code, InternalError)


def _rebuild(code: str, message: str, details: dict[str, Any]) -> MCPError:
    return error_class(code)(message, details=details)
