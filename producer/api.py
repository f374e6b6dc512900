"""The mcpq HTTP API: a FastAPI app over :class:`mcpq.producer.queue.ToolQueue`.

Read-only endpoints (servers, tools, health, breakers) are open; everything
that runs a tool, changes fleet state or reads a call's result is *admin* and
needs ``Authorization: Bearer $MCPQ_ADMIN_TOKEN``. With no token configured the
admin endpoints refuse with 403 (secure by default).

This module is the app factory, its two routers and their routes. The request
and response bodies are in ``mcpq.producer.api_models``; the status of every
error code and the error handlers are in ``mcpq.producer.api_errors``.

Like the rest of the producer it never imports the MCP SDK: it sends tasks by
name and reads shared state from Redis. Serve it with ``mcpq api`` or
``uvicorn --factory mcpq.producer.api:create_app``. See docs/http-api.md.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import Field

from mcpq.producer.api_errors import (
    ADMIN_DISABLED,
    UNAUTHORIZED,
    APIError,
    install_error_handlers,
    result_response,
)
from mcpq.producer.api_models import (
    MAX_BATCH,
    BreakerReset,
    BreakerStatus,
    CallAccepted,
    CallRequest,
    CallsAccepted,
    CallStatus,
    HealthReport,
    Reconnected,
    ServerHealth,
    ServerSummary,
    SyncCallRequest,
    ToolInfo,
    ToolResultModel,
    error_responses,
)
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
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import unreachable_cause, unreachable_error

log = logging.getLogger("mcpq.api")

T = TypeVar("T")

#: Default of GET /mcp/health's wait for a worker, seconds.
HEALTH_WAIT = 10.0
#: Longest wait an open (unauthenticated) request may ask for.
OPEN_MAX_WAIT = 30.0
#: Threads that may block waiting for results at once, admin (POST /mcp/call)
#: and open (GET /mcp/health) apart: kept apart from FastAPI's default pool so
#: waits never starve the other endpoints, and apart from each other so that
#: anyone who can reach the open endpoints cannot make admin calls queue.
WAIT_THREADS = 200
OPEN_WAIT_THREADS = 16

#: Fields of a server summary that the (open) listing leaves out: stdio args can
#: carry secrets expanded from ${VAR} (``--api-key ...``).
HIDDEN_SERVER_FIELDS = ("args",)


# --------------------------------------------------------------------------- state


class _State:
    """What every request needs: the settings, the (lazily built) queue, the wait limiter."""

    def __init__(self, queue: ToolQueue | None, settings: Settings) -> None:
        self.settings = settings
        self._queue = queue
        self.owns_queue = queue is None
        self._lock = threading.Lock()
        self._limiters: dict[bool, anyio.CapacityLimiter] = {}

    @property
    def queue(self) -> ToolQueue:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    self._queue = ToolQueue(self.settings)
        return self._queue

    def limiter(self, admin: bool) -> anyio.CapacityLimiter:
        """The wait pool for admin or for open requests (built on the event loop thread)."""
        if admin not in self._limiters:
            self._limiters[admin] = anyio.CapacityLimiter(WAIT_THREADS if admin else OPEN_WAIT_THREADS)
        return self._limiters[admin]

    def close(self) -> None:
        if self.owns_queue and self._queue is not None:
            self._queue.close()


def _state(request: Request) -> _State:
    state: _State = request.app.state.mcpq
    return state


def _queue(request: Request) -> ToolQueue:
    return _state(request).queue


QueueDep = Annotated[ToolQueue, Depends(_queue)]


async def _blocking(request: Request, admin: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a call that blocks on a worker in the admin or the open wait pool."""
    return await anyio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), limiter=_state(request).limiter(admin)
    )


# --------------------------------------------------------------------------- auth


def check_admin(token: str | None, authorization: str | None) -> None:
    """Raise APIError unless ``authorization`` is ``Bearer <token>`` (constant-time compare).

    :param token: the configured admin token; empty or None disables admin endpoints (403).
    :param authorization: the request's Authorization header, if any (401 unless it matches).
    """
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


# --------------------------------------------------------------------------- blocking work


def _call_status(queue: ToolQueue, task_id: str) -> CallStatus:
    handle = queue.get(task_id)
    ready = handle.ready()
    state = handle.state
    result = None
    if ready:
        result = ToolResultModel.model_validate(handle.result(timeout=10.0).to_dict())
    return CallStatus(task_id=task_id, state=state, ready=ready, result=result)


def _health(queue: ToolQueue, server: str | None, wait: float) -> HealthReport:
    if server is not None:
        _known_server(queue, server)  # 404 at once, not a worker's answer after the wait
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
    responses=error_responses(401, 403),
)


@public.get("/servers", response_model=list[ServerSummary], responses=error_responses(503))
def list_servers(queue: QueueDep) -> list[dict[str, Any]]:
    """Every server the fleet knows (published to Redis by the workers)."""
    rows = queue.servers()
    return [{k: v for k, v in row.items() if k not in HIDDEN_SERVER_FIELDS} for row in rows]


@public.get("/servers/{name}/tools", response_model=list[ToolInfo], responses=error_responses(404, 503))
def list_server_tools(name: ServerName, queue: QueueDep) -> list[dict[str, Any]]:
    """The tools one server offers (404 ``server_not_found`` for an unknown server)."""
    _known_server(queue, name)
    return queue.tools(name)


@public.get("/tools", response_model=list[ToolInfo], responses=error_responses(503))
def list_tools(queue: QueueDep) -> list[dict[str, Any]]:
    """Every tool of every server; ``ambiguous`` ones must be called as ``server/tool``."""
    return queue.tools()


@public.get("/health", response_model=HealthReport, responses=error_responses(404, 503))
async def health(
    request: Request,
    server: Annotated[str | None, Query(min_length=1, description="Only this server.")] = None,
    wait: Annotated[
        float, Query(gt=0, le=OPEN_MAX_WAIT, description="Seconds to wait for a worker (at most 30).")
    ] = HEALTH_WAIT,
) -> HealthReport:
    """A worker pings every enabled server (a real MCP round trip). 503 when no
    worker answers within ``wait``; 200 otherwise, ``healthy`` saying whether all answered."""
    return await _blocking(request, False, _health, _queue(request), server, wait)


@public.get("/circuit-breakers", response_model=dict[str, BreakerStatus], responses=error_responses(503))
def list_breakers(queue: QueueDep) -> dict[str, dict[str, Any]]:
    """Every known server's circuit breaker, shared by the whole fleet."""
    return queue.breakers()


@admin.post(
    "/call",
    response_model=ToolResultModel,
    responses={
        **error_responses(422, 503),
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
    # ToolQueue.call makes a failure to enqueue or a wait that ran out a failed
    # ToolResult too; on a timeout its details.task_id becomes the Location.
    result = await _blocking(
        request,
        True,
        _queue(request).call,
        body.tool,
        body.arguments,
        server=body.server,
        timeout=body.timeout,
        idempotency_key=body.idempotency_key,
        wait=body.wait,
    )
    return result_response(result)


CallsBody = Annotated[
    CallRequest | Annotated[list[CallRequest], Field(min_length=1, max_length=MAX_BATCH)],
    Body(description=f"One call, or a list of up to {MAX_BATCH}."),
]


@admin.post("/calls", status_code=202, response_model=CallsAccepted, responses=error_responses(422, 503))
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
                if unreachable_cause(exc) is None:
                    raise
                exc = unreachable_error("broker_or_backend", queue.settings.broker_url, exc)
            # Which call failed and which were already enqueued: the client must
            # not resubmit those (they will run).
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


@admin.post(
    "/circuit-breakers/{name}/reset", response_model=BreakerReset, responses=error_responses(404, 503)
)
def reset_breaker(name: ServerName, queue: QueueDep) -> BreakerReset:
    """Close a server's breaker for the whole fleet."""
    return BreakerReset(server=name, cleared=queue.reset_breaker(name))


@admin.post("/servers/{name}/reconnect", response_model=Reconnected, responses=error_responses(404, 503))
def reconnect_server(name: ServerName, queue: QueueDep) -> Reconnected:
    """Make every worker drop and reopen its sessions to the server (within ~1 s)."""
    answer = queue.reconnect(name)
    return Reconnected(server=name, epoch=int(answer["epoch"]))


# --------------------------------------------------------------------------- app


def create_app(queue: ToolQueue | None = None, settings: Settings | None = None) -> FastAPI:
    """The HTTP API (the factory ``uvicorn --factory mcpq.producer.api:create_app`` runs).

    :param queue: the ToolQueue to serve; default: one built on first use from ``settings``,
        and closed when the app shuts down.
    :param settings: default: ``queue.settings``, else the MCPQ_* environment. The admin
        token is ``settings.admin_token``.
    """
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
    install_error_handlers(app, settings)
    app.include_router(public)
    app.include_router(admin)
    return app


def serve(host: str, port: int) -> None:
    """``mcpq api``: serve the app with uvicorn until interrupted.

    :param host: the interface to listen on.
    :param port: the TCP port to listen on.
    """
    import uvicorn

    try:
        app = create_app()
    except ConfigError as exc:
        raise SystemExit(f"mcpq api: {exc.message}") from None
    if not app.state.mcpq.settings.admin_token:
        log.warning("MCPQ_ADMIN_TOKEN is not set: the admin endpoints will answer 403")
    uvicorn.run(app, host=host, port=port, log_level="info")
