"""The mcpq HTTP API: a FastAPI app over :class:`mcpq.producer.aio.AsyncToolQueue`.

Every endpoint is a coroutine on the queue's asyncio face: a request waiting
for a result holds no thread and no connection of its own (results arrive on
the queue's one listener connection).

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

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import Field

from mcpq.producer.aio import AsyncToolQueue
from mcpq.producer.api_errors import (
    ADMIN_DISABLED,
    UNAUTHORIZED,
    APIError,
    install_error_handlers,
    result_response,
)
from mcpq.producer.api_metrics import CONTENT_TYPE_LATEST, APIMetrics, MetricsMiddleware
from mcpq.producer.api_models import (
    MAX_BATCH,
    BreakerReset,
    BreakerStatus,
    CallAccepted,
    CallRequest,
    CallsAccepted,
    CallStatus,
    CancelAnswer,
    HealthReport,
    Reconnected,
    ServerHealth,
    ServerSummary,
    SyncCallRequest,
    ToolInfo,
    ToolResultModel,
    error_responses,
)
from mcpq.producer.events import CallEvent, ProgressEvent, ResultEvent, StatusEvent
from mcpq.worker.contract.errors import (
    ConfigError,
    ErrorCode,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    error_class,
)
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import unreachable_cause, unreachable_error

log = logging.getLogger("mcpq.api")

#: Default of GET /mcp/health's wait for a worker, seconds.
HEALTH_WAIT = 10.0
#: Longest wait an open (unauthenticated) request may ask for.
OPEN_MAX_WAIT = 30.0
#: A Server-Sent Events stream with nothing to say sends a comment this often,
#: so proxies and clients do not take a long call for a dead connection.
SSE_KEEPALIVE = 15.0

#: Fields of a server summary that the (open) listing leaves out: stdio args can
#: carry secrets expanded from ${VAR} (``--api-key ...``).
HIDDEN_SERVER_FIELDS = ("args",)


# --------------------------------------------------------------------------- state


class _State:
    """What every request needs: the settings and the (lazily built) queue."""

    def __init__(self, queue: AsyncToolQueue | None, settings: Settings) -> None:
        self.settings = settings
        self._queue = queue
        self.owns_queue = queue is None

    @property
    def queue(self) -> AsyncToolQueue:
        # Requests run on one event loop: no lock is needed to build it once.
        if self._queue is None:
            self._queue = AsyncToolQueue(self.settings)
        return self._queue

    async def close(self) -> None:
        if self.owns_queue and self._queue is not None:
            await self._queue.close()


def _state(request: Request) -> _State:
    state: _State = request.app.state.mcpq
    return state


def _queue(request: Request) -> AsyncToolQueue:
    return _state(request).queue


QueueDep = Annotated[AsyncToolQueue, Depends(_queue)]


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


# --------------------------------------------------------------------------- helpers


async def _health(queue: AsyncToolQueue, server: str | None, wait: float) -> HealthReport:
    if server is not None:
        await queue.known_server(server)  # 404 at once, not a worker's answer after the wait
    try:
        answer = await queue.health(server, wait=wait)
    except MCPTimeoutError as exc:
        # Nothing is pending on our side: the fleet is unavailable, not slow.
        raise MCPConnectionError(exc.message, details={"wait": wait}) from None
    if not answer.get("ok"):
        code = str(answer.get("error_code") or ErrorCode.INTERNAL_ERROR.value)
        raise error_class(code)(str(answer.get("error") or "health check failed"))
    report: dict[str, dict[str, Any]] = answer.get("result") or {}
    servers = {name: ServerHealth.model_validate(r) for name, r in report.items()}
    return HealthReport(healthy=all(s.healthy for s in servers.values()), servers=servers)


def sse_message(event: CallEvent) -> str:
    """One Server-Sent Event for a call event: ``event:`` its kind, ``data:`` its JSON.

    :param event: a status, progress or result event of :mod:`mcpq.producer.events`.
    """
    data: dict[str, Any]
    if isinstance(event, StatusEvent):
        data = {"state": event.state}
    elif isinstance(event, ProgressEvent):
        data = {"progress": event.progress, "total": event.total, "message": event.message}
    else:
        assert isinstance(event, ResultEvent)
        data = event.result.to_dict()
    return f"event: {event.kind}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def sse_error(exc: MCPError) -> str:
    """The ``error`` event that ends a stream which cannot go on: the error body
    (``error``, ``error_code``, ``details``) of the error responses; the call itself may still run."""
    data = {"error": exc.message, "error_code": exc.code.value, "details": exc.details}
    return f"event: error\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


async def _sse_stream(
    first: CallEvent, events: AsyncIterator[CallEvent], close: Callable[[], None]
) -> AsyncIterator[str]:
    """``first`` and the rest of ``events`` as SSE, a keep-alive comment when quiet."""
    pending: asyncio.Future[CallEvent] | None = None
    try:
        yield sse_message(first)
        if isinstance(first, ResultEvent):
            return
        while True:
            pending = asyncio.ensure_future(anext(events))
            while True:
                done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE)
                if done:
                    break
                yield ": keep-alive\n\n"
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            except MCPError as exc:
                # Headers are sent: the stream's last event says why it ends
                # (the result backend lost, the queue closing), not a cut connection.
                yield sse_error(exc)
                return
            yield sse_message(event)
            if isinstance(event, ResultEvent):
                return
    finally:
        if pending is not None and not pending.done():
            # The client went away mid-wait (cancelled, or closed at a keep-alive):
            # the read must end too, or it waits forever on a call nobody follows.
            # Not awaited: a cancelled scope would cancel that await at once.
            pending.cancel()
        close()
        with contextlib.suppress(Exception):  # the generator may already be closed
            await events.aclose()  # type: ignore[attr-defined]


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
async def list_servers(queue: QueueDep) -> list[dict[str, Any]]:
    """Every server the fleet knows (published to Redis by the workers)."""
    rows = await queue.servers()
    return [{k: v for k, v in row.items() if k not in HIDDEN_SERVER_FIELDS} for row in rows]


@public.get("/servers/{name}/tools", response_model=list[ToolInfo], responses=error_responses(404, 503))
async def list_server_tools(name: ServerName, queue: QueueDep) -> list[dict[str, Any]]:
    """The tools one server offers (404 ``server_not_found`` for an unknown server)."""
    await queue.known_server(name)
    return await queue.tools(name)


@public.get("/tools", response_model=list[ToolInfo], responses=error_responses(503))
async def list_tools(queue: QueueDep) -> list[dict[str, Any]]:
    """Every tool of every server; ``ambiguous`` ones must be called as ``server/tool``."""
    return await queue.tools()


@public.get("/health", response_model=HealthReport, responses=error_responses(404, 503))
async def health(
    queue: QueueDep,
    server: Annotated[str | None, Query(min_length=1, description="Only this server.")] = None,
    wait: Annotated[
        float, Query(gt=0, le=OPEN_MAX_WAIT, description="Seconds to wait for a worker (at most 30).")
    ] = HEALTH_WAIT,
) -> HealthReport:
    """A worker pings every enabled server (a real MCP round trip). 503 when no
    worker answers within ``wait``; 200 otherwise, ``healthy`` saying whether all answered."""
    return await _health(queue, server, wait)


@public.get("/circuit-breakers", response_model=dict[str, BreakerStatus], responses=error_responses(503))
async def list_breakers(queue: QueueDep) -> dict[str, dict[str, Any]]:
    """Every known server's circuit breaker, shared by the whole fleet."""
    return await queue.breakers()


@admin.post(
    "/call",
    response_model=ToolResultModel,
    responses={
        **error_responses(422, 503),
        404: {"model": ToolResultModel, "description": "tool_not_found / server_not_found"},
        409: {"model": ToolResultModel, "description": "ambiguous_tool / server_disabled / cancelled"},
        413: {"model": ToolResultModel, "description": "result_too_large"},
        429: {"model": ToolResultModel, "description": "limit_exceeded (Retry-After)"},
        500: {"model": ToolResultModel, "description": "internal_error / outcome_unknown"},
        502: {"model": ToolResultModel, "description": "protocol_error"},
        504: {"model": ToolResultModel, "description": "timeout (details.task_id to poll)"},
    },
)
async def call_tool(body: SyncCallRequest, queue: QueueDep) -> Response:
    """Call a tool and wait for its ToolResult. The status follows ``error_code``
    (see STATUS_BY_CODE); a ``tool_error`` is 200 with ``success: false``."""
    # AsyncToolQueue.call makes a failure to enqueue or a wait that ran out a
    # failed ToolResult too; on a timeout its details.task_id becomes the Location.
    result = await queue.call(
        body.tool,
        body.arguments,
        server=body.server,
        timeout=body.timeout,
        idempotency_key=body.idempotency_key,
        wait=body.wait,
        progress=body.progress,
    )
    return result_response(result)


CallsBody = Annotated[
    CallRequest | Annotated[list[CallRequest], Field(min_length=1, max_length=MAX_BATCH)],
    Body(description=f"One call, or a list of up to {MAX_BATCH}."),
]

CallId = Annotated[str, Path(min_length=1, max_length=256, description="A call's task id.")]


@admin.post("/calls", status_code=202, response_model=CallsAccepted, responses=error_responses(422, 503))
async def enqueue_calls(body: CallsBody, queue: QueueDep, response: Response) -> CallsAccepted:
    """Enqueue one call or a list of calls and return their ids at once (202).
    Every call is validated before any is enqueued."""
    calls = body if isinstance(body, list) else [body]
    accepted: list[CallAccepted] = []
    for index, call in enumerate(calls):
        try:
            handle = await queue.submit(
                call.tool,
                call.arguments,
                server=call.server,
                timeout=call.timeout,
                idempotency_key=call.idempotency_key,
                progress=call.progress,
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
        handle.close()  # nobody here waits for it: GET /mcp/calls/{id} reads it later
        accepted.append(CallAccepted(task_id=handle.id, tool=handle.tool, url=f"/mcp/calls/{handle.id}"))
    if len(accepted) == 1:
        response.headers["Location"] = accepted[0].url
    return CallsAccepted(calls=accepted)


@admin.get("/calls/{task_id}", response_model=CallStatus, responses=error_responses(422, 503))
async def get_call(task_id: CallId, queue: QueueDep) -> CallStatus:
    """A call's state, and its ToolResult once ready (always 200: the result's own
    error_code says how the call went). An unknown or expired id is PENDING,
    exactly as Celery reports it: ids cannot be told apart from queued calls."""
    state, result = await queue.call_state(task_id)
    model = None if result is None else ToolResultModel.model_validate(result.to_dict())
    return CallStatus(task_id=task_id, state=state, ready=result is not None, result=model)


@admin.get(
    "/calls/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-Sent Events: `status`, `progress` (for calls sent with "
            "`progress: true`), then one `result` (the ToolResult); the stream ends after it.",
        },
        **error_responses(404, 422, 503),
    },
)
async def call_events(task_id: CallId, queue: QueueDep) -> StreamingResponse:
    """Follow a call as Server-Sent Events until its result. 404 ``call_not_found``
    for an id no call has."""
    handle = queue.get(task_id, progress=True)
    events = handle.events()
    try:
        first = await anext(events)  # an unknown id fails here, as a 404, before streaming
    except BaseException:
        handle.close()
        raise
    return StreamingResponse(
        _sse_stream(first, events, handle.close),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@admin.delete(
    "/calls/{task_id}",
    response_model=CancelAnswer,
    responses={
        202: {"model": CancelAnswer, "description": "cancel requested"},
        **error_responses(404, 422, 503),
    },
)
async def cancel_call(task_id: CallId, queue: QueueDep, response: Response) -> CancelAnswer:
    """Cancel a call. 200 with its result when it had already finished (nothing
    changes); 202 once the cancel is requested: a queued or waiting call never
    reaches the server, a running one is interrupted, and it ends with
    ``error_code: cancelled`` (GET /mcp/calls/{id}). 404 ``call_not_found``."""
    outcome = await queue.cancel(task_id)
    if outcome.state == "requested":
        response.status_code = 202
    result = None if outcome.result is None else ToolResultModel.model_validate(outcome.result.to_dict())
    return CancelAnswer(task_id=outcome.id, state=outcome.state, result=result)


@admin.post(
    "/circuit-breakers/{name}/reset", response_model=BreakerReset, responses=error_responses(404, 503)
)
async def reset_breaker(name: ServerName, queue: QueueDep) -> BreakerReset:
    """Close a server's breaker for the whole fleet."""
    return BreakerReset(server=name, cleared=await queue.reset_breaker(name))


@admin.post("/servers/{name}/reconnect", response_model=Reconnected, responses=error_responses(404, 503))
async def reconnect_server(name: ServerName, queue: QueueDep) -> Reconnected:
    """Make every worker drop and reopen its sessions to the server (within ~1 s)."""
    answer = await queue.reconnect(name)
    return Reconnected(server=name, epoch=int(answer["epoch"]))


# --------------------------------------------------------------------------- app


def create_app(queue: AsyncToolQueue | None = None, settings: Settings | None = None) -> FastAPI:
    """The HTTP API (the factory ``uvicorn --factory mcpq.producer.api:create_app`` runs).

    :param queue: the AsyncToolQueue to serve (it must be used on the server's event loop
        only); default: one built on first use from ``settings``, closed when the app shuts down.
    :param settings: default: ``queue.settings``, else the MCPQ_* environment. The admin
        token is ``settings.admin_token``.
    """
    settings = settings or (queue.settings if queue is not None else Settings.from_env())
    state = _State(queue, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.close()

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
    _add_metrics(app, state)
    return app


def _add_metrics(app: FastAPI, state: _State) -> None:
    """``GET /metrics`` (open, like Flower's; not in the OpenAPI document): docs/observability.md."""
    metrics = APIMetrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def serve_metrics() -> Response:
        body = await metrics.exposition(state.queue.breakers)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


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
