"""The HTTP API's request and response bodies (pydantic models).

Only shapes live here: they define both what FastAPI validates and what the
OpenAPI document shows. Routes are in ``mcpq.producer.api``; how errors become
statuses and bodies is in ``mcpq.producer.api_errors``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: At most this many calls in one POST /mcp/calls.
MAX_BATCH = 1000
#: Upper bound of every client-chosen wait, seconds.
MAX_WAIT = 3600.0


class ErrorBody(BaseModel):
    """Every error this API answers with. POST /mcp/call answers with a full
    ToolResult instead, which has the same ``error``/``error_code``/``details``."""

    error: str = Field(description="What went wrong, for humans.")
    error_code: str = Field(description="Stable code: one of DESIGN's error codes, or an HTTP-only code.")
    details: dict[str, Any] = Field(default_factory=dict)


class CallRequest(BaseModel):
    """One tool call."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1, description="Tool name, or 'server/tool'.", examples=["local/add"])
    arguments: dict[str, Any] = Field(default_factory=dict, examples=[{"a": 2, "b": 40}])
    server: str | None = Field(default=None, min_length=1, description="Server to call (else routed).")
    timeout: float | None = Field(
        default=None, gt=0, le=MAX_WAIT, description="Call deadline, seconds (default: the server's)."
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="The same key with the same call within the window returns the first call's result.",
    )
    progress: bool = Field(
        default=False,
        description="Relay the server's progress notifications: GET /mcp/calls/{id}/events streams them.",
    )


class SyncCallRequest(CallRequest):
    """One tool call whose result the request waits for."""

    wait: float | None = Field(
        default=None,
        gt=0,
        le=MAX_WAIT,
        description="Seconds to wait for the result (default: timeout + 10). On expiry: 504 with the "
        "task id; the call may still run, GET /mcp/calls/{id} finds it.",
    )


class ToolResultModel(BaseModel):
    """The ToolResult every call ends with (worker/result.py)."""

    success: bool
    tool_name: str
    server_name: str | None = None
    data: dict[str, Any] | None = Field(
        default=None, description="The MCP CallToolResult: content, structuredContent, isError."
    )
    error: str | None = None
    error_code: str | None = None
    execution_time_ms: float = 0.0
    request_id: str | None = None
    attempts: int = 1
    details: dict[str, Any] = Field(default_factory=dict)


class CallAccepted(BaseModel):
    task_id: str
    tool: str
    url: str = Field(description="Where the call's state and result are: GET this (admin).")


class CallsAccepted(BaseModel):
    calls: list[CallAccepted]


class CallStatus(BaseModel):
    task_id: str
    state: str = Field(
        description="Celery state: PENDING (queued, or an unknown/expired id), STARTED, RETRY, "
        "SUCCESS, FAILURE."
    )
    ready: bool
    result: ToolResultModel | None = None


class CancelAnswer(BaseModel):
    """What DELETE /mcp/calls/{id} did."""

    task_id: str
    state: Literal["finished", "requested"] = Field(
        description="finished: the call had ended (result holds it, nothing changed); requested: "
        "it will end with error_code cancelled (GET /mcp/calls/{id} or its events)."
    )
    result: ToolResultModel | None = None


class ServerSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    transport: str | None = None
    url: str | None = None
    command: str | None = None
    enabled: bool = True
    description: str = ""
    protocol_version: str | None = None
    server_info: dict[str, Any] | None = None
    tools: int | None = Field(default=None, description="Tools discovered (null: not discovered yet).")
    discovered_at: float | None = None


class ToolInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    server: str
    name: str
    ambiguous: bool = Field(description="Several servers offer it: call it as 'server/name'.")
    description: str | None = None
    inputSchema: dict[str, Any] | None = None  # MCP's spelling


class BreakerStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: str = Field(description="closed, open or half_open")
    failures: int = 0
    opened_at: float | None = None
    next_probe_at: float | None = None
    probe_in_flight: int = 0
    last_error: str | None = None
    trips: int = 0
    in_flight: int = 0


class BreakerReset(BaseModel):
    server: str
    cleared: bool = Field(description="False when the breaker was already closed.")
    state: str = "closed"


class Reconnected(BaseModel):
    server: str
    epoch: int = Field(description="Every worker reopens its sessions when it sees this epoch (~1 s).")


class ServerHealth(BaseModel):
    model_config = ConfigDict(extra="allow")

    healthy: bool
    latency_ms: float | None = None
    protocol_version: str | None = None
    error: str | None = None
    error_code: str | None = None


class HealthReport(BaseModel):
    healthy: bool = Field(description="True when every reported server answered.")
    servers: dict[str, ServerHealth]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries saying each of ``statuses`` answers with an ErrorBody.

    :param statuses: the HTTP statuses a route (or router) may answer with an error body.
    """
    return {status: {"model": ErrorBody} for status in statuses}
