"""An mcpq ToolResult as the MCP client sees it: one table, documented in docs/gateway.md.

- The tool ran (``success``, or ``tool_error`` with the server's content): the
  upstream ``CallToolResult`` unchanged (``content``, ``structuredContent``,
  ``isError``), with the call's id under ``_meta["mcpq/call"]``.
- The request itself was wrong (unknown tool, ambiguous tool, unknown server,
  arguments failing the inputSchema): a JSON-RPC error ``-32602`` (invalid
  params), as the spec answers an unknown tool; nothing reached a server.
- Anything else mcpq ran into (an open breaker, a deadline, an unreachable
  server, a cancelled call, ...): a tool result with ``isError: true``, so the
  model sees it and may retry; its text starts with the mcpq error code and
  ``_meta["mcpq/error"]`` carries the code, message and call id.
"""

from __future__ import annotations

from typing import Any

from mcp.shared.exceptions import MCPError as ProtocolLevelError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, CallToolResult, TextContent

from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.result import ToolResult

#: mcpq codes answered as a JSON-RPC error (the request was wrong); every other failure is ``isError``.
REQUEST_ERRORS: dict[str, int] = {
    ErrorCode.TOOL_NOT_FOUND: INVALID_PARAMS,
    ErrorCode.AMBIGUOUS_TOOL: INVALID_PARAMS,
    ErrorCode.SERVER_NOT_FOUND: INVALID_PARAMS,
    ErrorCode.INVALID_ARGUMENTS: INVALID_PARAMS,
}
#: ``_meta`` keys the gateway adds (the ``mcpq/`` prefix is ours, per the spec's ``_meta`` rules).
CALL_META = "mcpq/call"
ERROR_META = "mcpq/error"


def request_error(code: str, message: str, details: dict[str, Any] | None = None) -> ProtocolLevelError:
    """The JSON-RPC error for a request the fleet refused before sending anything
    (``-32602``), or that the gateway could not serve at all (``-32603``: e.g. the
    state Redis is unreachable, so there is no catalog to answer from).

    :param code: the mcpq error code (``tool_not_found``, ``invalid_arguments``, ``connection_error``, ...).
    :param message: what a person can act on.
    :param details: safe details (names, schema paths; never argument values).
    """
    data: dict[str, Any] = {"mcpq_code": code}
    if details:
        data["details"] = details
    return ProtocolLevelError(code=REQUEST_ERRORS.get(code, INTERNAL_ERROR), message=message, data=data)


def to_mcp(result: ToolResult) -> CallToolResult:
    """The CallToolResult for ``result``.

    :raises mcp.shared.exceptions.MCPError: for the codes of :data:`REQUEST_ERRORS`.
    """
    call = {"id": result.request_id, "server": result.server_name, "attempts": result.attempts}
    ran = result.success or (result.error_code == ErrorCode.TOOL_ERROR and result.data is not None)
    if ran and result.data is not None:
        upstream = CallToolResult.model_validate(result.data)
        meta = dict(upstream.meta or {})
        meta[CALL_META] = call
        return upstream.model_copy(update={"meta": meta})
    code = result.error_code or ErrorCode.INTERNAL_ERROR
    message = result.error or code
    if code in REQUEST_ERRORS:
        raise request_error(code, message, _safe_details(result.details))
    return CallToolResult(
        content=[TextContent(type="text", text=f"mcpq error {code}: {message}")],
        is_error=True,
        _meta={CALL_META: call, ERROR_META: {"code": code, "message": message}},
    )


def outcome_of(answer: CallToolResult | ProtocolLevelError) -> str:
    """What an answer of :func:`to_mcp` says happened: ``ok`` or the mcpq error code (for metrics)."""
    if isinstance(answer, ProtocolLevelError):
        data = answer.error.data
        return str(data.get("mcpq_code", ErrorCode.INTERNAL_ERROR)) if isinstance(data, dict) else "error"
    error = (answer.meta or {}).get(ERROR_META)
    if isinstance(error, dict):
        return str(error.get("code", ErrorCode.INTERNAL_ERROR))
    return ErrorCode.TOOL_ERROR.value if answer.is_error else "ok"


def _safe_details(details: dict[str, Any]) -> dict[str, Any]:
    """Details fit for a client: the names the error is about, never a value the caller sent."""
    return {k: v for k, v in details.items() if k in {"tool", "server", "servers", "suggestions", "problems"}}
