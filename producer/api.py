"""The mcpq HTTP API: a FastAPI app over :class:`mcpq.producer.queue.ToolQueue`.

Read-only endpoints (servers, tools, health, breakers) are open; everything
that runs a tool, changes fleet state or reads a call's result is *admin* and
needs ``Authorization: Bearer $MCPQ_ADMIN_TOKEN``. With no token configured the
admin endpoints refuse with 403 (secure by default).

Like the rest of the producer this module never imports the MCP SDK: it sends
tasks by name and reads shared state from Redis. Serve it with ``mcpq api`` or
``uvicorn --factory mcpq.producer.api:create_app``. See docs/http-api.md.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
import redis
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.errors import (
    ConfigError,
    ErrorCode,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    ServerNotFoundError,
    error_class,
)
from mcpq.worker.contract.redact import redact_url
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings

log = logging.getLogger("mcpq.api")

T = TypeVar("T")

#: Error codes that only the HTTP layer produces (never a ToolResult's error_code).
UNAUTHORIZED = "unauthorized"
ADMIN_DISABLED = "admin_disabled"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
HTTP_ERROR = "http_error"

#: THE mapping from error code to HTTP status, for every error body and every
#: failed ToolResult this API returns. Unknown codes answer 500.
STATUS_BY_CODE: dict[str, int] = {
    ErrorCode.TOOL_NOT_FOUND: 404,
    ErrorCode.SERVER_NOT_FOUND: 404,
    ErrorCode.AMBIGUOUS_TOOL: 409,
    ErrorCode.SERVER_DISABLED: 409,
    ErrorCode.INVALID_ARGUMENTS: 422,
    # The tool ran and answered (isError: true): the HTTP exchange succeeded,
    # the body says success=false and carries the tool's own content in data.
    ErrorCode.TOOL_ERROR: 200,
    ErrorCode.RESULT_TOO_LARGE: 413,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.OUTCOME_UNKNOWN: 500,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.CONFIG_ERROR: 500,
    ErrorCode.PROTOCOL_ERROR: 502,
    ErrorCode.CIRCUIT_OPEN: 503,
    ErrorCode.CONNECTION_ERROR: 503,
    ErrorCode.TIMEOUT: 504,
    UNAUTHORIZED: 401,
    ADMIN_DISABLED: 403,
    NOT_FOUND: 404,
    METHOD_NOT_ALLOWED: 405,
}

#: Codes whose bodies carry ``details.retry_after`` (seconds): sent as Retry-After.
RETRY_AFTER_CODES = frozenset({ErrorCode.CIRCUIT_OPEN.value, ErrorCode.LIMIT_EXCEEDED.value})

#: At most this many calls in one POST /mcp/calls.
MAX_BATCH = 1000
#: Upper bound of every client-chosen wait, seconds.
MAX_WAIT = 3600.0
#: Default of GET /mcp/health's wait for a worker, seconds (at most 120).
HEALTH_WAIT = 10.0
#: Threads that may block waiting for results (POST /mcp/call, health) at once;
#: kept apart from FastAPI's default pool so waits never starve the other endpoints.
WAIT_THREADS = 200

#: Fields of a server summary that the (open) listing leaves out: stdio args can
#: carry secrets expanded from ${VAR} (``--api-key ...``).
HIDDEN_SERVER_FIELDS = ("args",)


def status_for(code: str | None) -> int:
    """The HTTP status for an error code (500 for codes this table does not know)."""
    return STATUS_BY_CODE.get(code or ErrorCode.INTERNAL_ERROR.value, 500)


# --------------------------------------------------------------------------- models


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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


# --------------------------------------------------------------------------- state


class APIError(Exception):
    """An error the HTTP layer itself answers with (auth, unknown routes)."""

    def __init__(
        self, code: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


class _State:
    """What every request needs: the settings, the (lazily built) queue, the wait limiter."""

    def __init__(self, queue: ToolQueue | None, settings: Settings) -> None:
        self.settings = settings
        self._queue = queue
        self.owns_queue = queue is None
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def queue(self) -> ToolQueue:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    self._queue = ToolQueue(self.settings)
        return self._queue

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # only ever touched on the event loop thread
            self._limiter = anyio.CapacityLimiter(WAIT_THREADS)
        return self._limiter

    def close(self) -> None:
        if self.owns_queue and self._queue is not None:
            self._queue.close()


def _state(request: Request) -> _State:
    state: _State = request.app.state.mcpq
    return state


def _queue(request: Request) -> ToolQueue:
    return _state(request).queue


QueueDep = Annotated[ToolQueue, Depends(_queue)]


async def _blocking(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a call that blocks on a worker in the dedicated wait pool."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=_state(request).limiter)


# --------------------------------------------------------------------------- auth


def check_admin(token: str | None, authorization: str | None) -> None:
    """Raise APIError unless ``authorization`` is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        raise APIError(
            ADMIN_DISABLED,
            "admin endpoints are disabled: set MCPQ_ADMIN_TOKEN on the API server to enable them, "
            "then send 'Authorization: Bearer <token>'",
        )
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not authorization or scheme.lower() != "bearer" or not credentials:
        raise APIError(
            UNAUTHORIZED,
            "this endpoint needs 'Authorization: Bearer <MCPQ_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="mcpq"'},
        )
    # Header values arrive latin-1 decoded: encoding back gives the raw bytes.
    given = credentials.encode("latin-1", errors="replace")
    if not hmac.compare_digest(given, token.encode("utf-8")):
        raise APIError(
            UNAUTHORIZED,
            "the bearer token is not the admin token",
            headers={"WWW-Authenticate": 'Bearer realm="mcpq", error="invalid_token"'},
        )


class AdminRoute(APIRoute):
    """A route that checks the admin token before anything else, the request
    body included: an unauthenticated caller learns nothing from 422s."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            check_admin(_state(request).settings.admin_token, request.headers.get("authorization"))
            return await handler(request)

        return guarded


#: Only for the OpenAPI document (the "Authorize" button); AdminRoute enforces.
_bearer_scheme = HTTPBearer(auto_error=False, description="MCPQ_ADMIN_TOKEN")


# --------------------------------------------------------------------------- error bodies


def error_response(
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> JSONResponse:
    body = {"error": message, "error_code": code, "details": jsonable_encoder(details or {})}
    return JSONResponse(
        body,
        status_code=status or status_for(code),
        headers={**_retry_after(code, details), **(headers or {})},
    )


def _retry_after(code: str | None, details: dict[str, Any] | None) -> dict[str, str]:
    if code not in RETRY_AFTER_CODES or not details:
        return {}
    wait = details.get("retry_after")
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not math.isfinite(wait):
        return {}
    return {"Retry-After": str(max(1, math.ceil(wait)))}


def result_response(result: ToolResult) -> JSONResponse:
    """A ToolResult as the body; the status from its error code (200 on success)."""
    body = jsonable_encoder(result.to_dict())
    if result.success:
        return JSONResponse(body)
    headers = _retry_after(result.error_code, result.details)
    task_id = result.details.get("task_id")  # set when *we* stopped waiting: the call may still run
    if result.error_code == ErrorCode.TIMEOUT.value and task_id:
        headers["Location"] = f"/mcp/calls/{task_id}"
    return JSONResponse(body, status_code=status_for(result.error_code), headers=headers)


def _error_text(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", ""))
    ctx = error.get("ctx") or {}
    if error.get("type") == "json_invalid" and ctx.get("error"):
        msg = f"{msg}: {ctx['error']}"
    return msg


def unreachable_cause(exc: BaseException) -> BaseException | None:
    """The Redis or broker connection failure behind ``exc``, if any. Celery wraps
    some (a result backend that was never reachable raises RuntimeError from
    redis.ConnectionError), so the whole cause chain is searched."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, redis.ConnectionError | redis.TimeoutError | OperationalError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc.code, exc.message, exc.details, exc.headers)

    async def on_mcp_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MCPError)
        return error_response(exc.code.value, exc.message, exc.details)

    async def on_redis_error(request: Request, exc: Exception) -> Response:
        log.warning("Redis unreachable: %s", exc)
        return error_response(
            ErrorCode.CONNECTION_ERROR.value,
            f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}",
            {"redis": redact_url(settings.redis_url)},
        )

    async def on_broker_error(request: Request, exc: Exception) -> Response:
        log.warning("broker unreachable: %s", exc)
        return error_response(
            ErrorCode.CONNECTION_ERROR.value,
            f"cannot reach the broker at {redact_url(settings.broker_url)}: {exc}",
            {"broker": redact_url(settings.broker_url)},
        )

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # No "input": it may echo secrets from the request body back.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": _error_text(e), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"]) or "request"
        return error_response(
            ErrorCode.INVALID_ARGUMENTS.value,
            f"invalid request: {where}: {first['msg']}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            {"errors": errors},
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 400: ErrorCode.INVALID_ARGUMENTS.value}.get(
            exc.status_code, HTTP_ERROR
        )
        return error_response(code, str(exc.detail), headers=dict(exc.headers or {}), status=exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        cause = unreachable_cause(exc)
        if cause is not None:
            log.warning("Redis or broker unreachable: %s", cause)
            return error_response(
                ErrorCode.CONNECTION_ERROR.value,
                f"cannot reach Redis or the broker ({redact_url(settings.broker_url)}): {cause}",
                {"broker": redact_url(settings.broker_url), "redis": redact_url(settings.redis_url)},
            )
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(
            ErrorCode.INTERNAL_ERROR.value,
            f"internal error in the mcpq HTTP API ({type(exc).__name__}); see the API server's log",
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(MCPError, on_mcp_error)
    app.add_exception_handler(redis.RedisError, on_redis_error)
    app.add_exception_handler(OperationalError, on_broker_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


# --------------------------------------------------------------------------- blocking work


def _call_and_wait(queue: ToolQueue, body: SyncCallRequest) -> ToolResult:
    label = f"{body.server}/{body.tool}" if body.server else body.tool
    try:
        handle = queue.submit(
            body.tool,
            body.arguments,
            server=body.server,
            timeout=body.timeout,
            idempotency_key=body.idempotency_key,
        )
    except MCPError as exc:  # broker unreachable, idempotency key reused for another call
        return ToolResult.failure(label, exc)
    except Exception as exc:
        cause = unreachable_cause(exc)
        if cause is None:
            raise
        return ToolResult.failure(
            label, MCPConnectionError(f"cannot enqueue: Redis or the broker is unreachable: {cause}")
        )
    try:
        return handle.result(body.wait)
    except MCPTimeoutError as exc:
        return ToolResult.failure(label, exc, request_id=handle.id)


def _call_status(queue: ToolQueue, task_id: str) -> CallStatus:
    handle = queue.get(task_id)
    ready = handle.ready()
    state = handle.state
    result = None
    if ready:
        result = ToolResultModel.model_validate(handle.result(timeout=10.0).to_dict())
    return CallStatus(task_id=task_id, state=state, ready=ready, result=result)


def _health(queue: ToolQueue, server: str | None, wait: float) -> HealthReport:
    try:
        answer = queue.health(server, wait=wait)
    except MCPTimeoutError as exc:
        # Nothing is pending on our side: the fleet is unavailable, not slow.
        raise MCPConnectionError(exc.message, details={"wait": wait}) from None
    if not answer.get("ok"):
        code = str(answer.get("error_code") or ErrorCode.INTERNAL_ERROR.value)
        raise error_class(code)(str(answer.get("error") or "health check failed"))
    report: dict[str, dict[str, Any]] = answer.get("result") or {}
    servers = {name: ServerHealth.model_validate(r) for name, r in report.items()}
    return HealthReport(healthy=all(s.healthy for s in servers.values()), servers=servers)


def _known_server(queue: ToolQueue, name: str) -> None:
    if not queue.redis.hexists(queue.keys.servers, name):
        raise ServerNotFoundError(f"no server named {name!r} is known to the fleet", details={"server": name})


# --------------------------------------------------------------------------- routes

ServerName = Annotated[str, Path(min_length=1, description="A server name from GET /mcp/servers.")]

public = APIRouter(prefix="/mcp", tags=["fleet (open)"])
admin = APIRouter(
    prefix="/mcp",
    tags=["admin (bearer token)"],
    route_class=AdminRoute,
    dependencies=[Depends(_bearer_scheme)],
    responses=_errors(401, 403),
)


@public.get("/servers", response_model=list[ServerSummary], responses=_errors(503))
def list_servers(queue: QueueDep) -> list[dict[str, Any]]:
    """Every server the fleet knows (published to Redis by the workers)."""
    rows = queue.servers()
    return [{k: v for k, v in row.items() if k not in HIDDEN_SERVER_FIELDS} for row in rows]


@public.get("/servers/{name}/tools", response_model=list[ToolInfo], responses=_errors(404, 503))
def list_server_tools(name: ServerName, queue: QueueDep) -> list[dict[str, Any]]:
    """The tools one server offers (404 ``server_not_found`` for an unknown server)."""
    _known_server(queue, name)
    return queue.tools(name)


@public.get("/tools", response_model=list[ToolInfo], responses=_errors(503))
def list_tools(queue: QueueDep) -> list[dict[str, Any]]:
    """Every tool of every server; ``ambiguous`` ones must be called as ``server/tool``."""
    return queue.tools()


@public.get("/health", response_model=HealthReport, responses=_errors(404, 503))
async def health(
    request: Request,
    server: Annotated[str | None, Query(min_length=1, description="Only this server.")] = None,
    wait: Annotated[float, Query(gt=0, le=120, description="Seconds to wait for a worker.")] = HEALTH_WAIT,
) -> HealthReport:
    """A worker pings every enabled server (a real MCP round trip). 503 when no
    worker answers within ``wait``; 200 otherwise, ``healthy`` saying whether all answered."""
    return await _blocking(request, _health, _queue(request), server, wait)


@public.get("/circuit-breakers", response_model=dict[str, BreakerStatus], responses=_errors(503))
def list_breakers(queue: QueueDep) -> dict[str, dict[str, Any]]:
    """Every known server's circuit breaker, shared by the whole fleet."""
    return queue.breakers()


@admin.post(
    "/call",
    response_model=ToolResultModel,
    responses={
        **_errors(422, 503),
        404: {"model": ToolResultModel, "description": "tool_not_found / server_not_found"},
        409: {"model": ToolResultModel, "description": "ambiguous_tool / server_disabled"},
        413: {"model": ToolResultModel, "description": "result_too_large"},
        429: {"model": ToolResultModel, "description": "limit_exceeded (Retry-After)"},
        500: {"model": ToolResultModel, "description": "internal_error / outcome_unknown"},
        502: {"model": ToolResultModel, "description": "protocol_error"},
        504: {"model": ToolResultModel, "description": "timeout (details.task_id to poll)"},
    },
)
async def call_tool(request: Request, body: SyncCallRequest) -> Response:
    """Call a tool and wait for its ToolResult. The status follows ``error_code``
    (see STATUS_BY_CODE); a ``tool_error`` is 200 with ``success: false``."""
    result = await _blocking(request, _call_and_wait, _queue(request), body)
    return result_response(result)


CallsBody = Annotated[
    CallRequest | Annotated[list[CallRequest], Field(min_length=1, max_length=MAX_BATCH)],
    Body(description=f"One call, or a list of up to {MAX_BATCH}."),
]


@admin.post("/calls", status_code=202, response_model=CallsAccepted, responses=_errors(422, 503))
def enqueue_calls(body: CallsBody, queue: QueueDep, response: Response) -> CallsAccepted:
    """Enqueue one call or a list of calls and return their ids at once (202).
    Every call is validated before any is enqueued."""
    calls = body if isinstance(body, list) else [body]
    accepted: list[CallAccepted] = []
    for index, call in enumerate(calls):
        try:
            handle = queue.submit(
                call.tool,
                call.arguments,
                server=call.server,
                timeout=call.timeout,
                idempotency_key=call.idempotency_key,
            )
        except Exception as exc:
            enqueued = [a.task_id for a in accepted]
            if not isinstance(exc, MCPError):
                cause = unreachable_cause(exc)
                if cause is None:
                    raise
                exc = MCPConnectionError(f"cannot enqueue: Redis or the broker is unreachable: {cause}")
            raise type(exc)(
                f"{exc.message} (call {index}; {len(enqueued)} earlier calls were enqueued)",
                details={**exc.details, "index": index, "enqueued": enqueued},
            ) from None
        accepted.append(CallAccepted(task_id=handle.id, tool=handle.tool, url=f"/mcp/calls/{handle.id}"))
    if len(accepted) == 1:
        response.headers["Location"] = accepted[0].url
    return CallsAccepted(calls=accepted)


@admin.get("/calls/{task_id}", response_model=CallStatus)
def get_call(task_id: Annotated[str, Path(min_length=1, max_length=256)], queue: QueueDep) -> CallStatus:
    """A call's state, and its ToolResult once ready (always 200: the result's own
    error_code says how the call went). An unknown or expired id is PENDING,
    exactly as Celery reports it: ids cannot be told apart from queued calls."""
    return _call_status(queue, task_id)


@admin.post("/circuit-breakers/{name}/reset", response_model=BreakerReset, responses=_errors(404, 503))
def reset_breaker(name: ServerName, queue: QueueDep) -> BreakerReset:
    """Close a server's breaker for the whole fleet."""
    return BreakerReset(server=name, cleared=queue.reset_breaker(name))


@admin.post("/servers/{name}/reconnect", response_model=Reconnected, responses=_errors(404, 503))
def reconnect_server(name: ServerName, queue: QueueDep) -> Reconnected:
    """Make every worker drop and reopen its sessions to the server (within ~1 s)."""
    answer = queue.reconnect(name)
    return Reconnected(server=name, epoch=int(answer["epoch"]))


# --------------------------------------------------------------------------- app


def create_app(queue: ToolQueue | None = None, settings: Settings | None = None) -> FastAPI:
    """The HTTP API. ``queue`` defaults to a ToolQueue built (on first use) from
    ``settings``, which default to ``queue.settings`` or the MCPQ_* environment.
    The admin token is ``settings.admin_token``."""
    settings = settings or (queue.settings if queue is not None else Settings.from_env())
    state = _State(queue, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(
        title="mcpq HTTP API",
        version="0.1.0",
        description=(
            "MCP tool calls as Celery tasks. Read-only endpoints are open; admin endpoints need "
            "`Authorization: Bearer $MCPQ_ADMIN_TOKEN`. Errors are `{error, error_code, details}`."
        ),
        lifespan=lifespan,
    )
    app.state.mcpq = state
    _install_error_handlers(app, settings)
    app.include_router(public)
    app.include_router(admin)
    return app


def serve(host: str, port: int) -> None:
    """``mcpq api``: serve the app with uvicorn until interrupted."""
    import uvicorn

    try:
        app = create_app()
    except ConfigError as exc:
        raise SystemExit(f"mcpq api: {exc.message}") from None
    if not app.state.mcpq.settings.admin_token:
        log.warning("MCPQ_ADMIN_TOKEN is not set: the admin endpoints will answer 403")
    uvicorn.run(app, host=host, port=port, log_level="info")
