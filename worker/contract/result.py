"""ToolResult: what every call ends with, on the wire as a plain JSON dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mcpq.worker.contract.errors import ErrorCode, MCPError, error_class


@dataclass(slots=True)
class ToolResult:
    """The outcome of one tool call.

    ``data`` holds the MCP ``CallToolResult`` as JSON (``content``,
    ``structuredContent``, ``isError``) whenever the server answered, also for
    ``tool_error`` results, so the tool's own error text is never lost.
    """

    success: bool
    tool_name: str
    server_name: str | None = None
    data: dict[str, Any] | None = None
    error: str | None = None
    error_code: str | None = None
    execution_time_ms: float = 0.0
    request_id: str | None = None
    attempts: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, tool_name: str, server_name: str, data: dict[str, Any], **kw: Any) -> ToolResult:
        return cls(success=True, tool_name=tool_name, server_name=server_name, data=data, **kw)

    @classmethod
    def failure(
        cls,
        tool_name: str,
        error: MCPError,
        *,
        server_name: str | None = None,
        data: dict[str, Any] | None = None,
        **kw: Any,
    ) -> ToolResult:
        return cls(
            success=False,
            tool_name=tool_name,
            server_name=server_name,
            data=data,
            error=error.message,
            error_code=error.code.value,
            details=dict(error.details),
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ToolResult:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    # Conveniences for callers -------------------------------------------------
    @property
    def content(self) -> list[dict[str, Any]]:
        return list((self.data or {}).get("content") or [])

    @property
    def structured(self) -> Any:
        return (self.data or {}).get("structuredContent")

    @property
    def text(self) -> str:
        """The text parts of the content joined by newlines ('' if none)."""
        return "\n".join(str(c.get("text", "")) for c in self.content if c.get("type") == "text")

    def raise_for_error(self) -> ToolResult:
        """Return self on success, else raise the matching MCPError subclass."""
        if self.success:
            return self
        cls = error_class(self.error_code or ErrorCode.INTERNAL_ERROR.value)
        raise cls(self.error or "unknown error", details={**self.details, "result": self.to_dict()})
