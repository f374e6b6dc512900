"""How the HTTP API turns errors into responses: the status of every error code,
the ``{error, error_code, details}`` body, Retry-After and Location headers, and
the exception handlers that make every failure (ours, MCP's, Redis', the
broker's, FastAPI's) answer in that one shape.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mcpq.worker.contract.errors import ErrorCode, MCPError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import unreachable_cause, unreachable_error

# The API's logger, shared with mcpq.producer.api: one name to filter on.
log = logging.getLogger("mcpq.api")

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
    # Someone cancelled the call this request waited for: it conflicts with them.
    ErrorCode.CANCELLED: 409,
    ErrorCode.CALL_NOT_FOUND: 404,
    UNAUTHORIZED: 401,
    ADMIN_DISABLED: 403,
    NOT_FOUND: 404,
    METHOD_NOT_ALLOWED: 405,
}

#: Codes whose bodies carry ``details.retry_after`` (seconds): sent as Retry-After.
RETRY_AFTER_CODES = frozenset({ErrorCode.CIRCUIT_OPEN.value, ErrorCode.LIMIT_EXCEEDED.value})


def status_for(code: str | None) -> int:
    """The HTTP status for an error code (500 for codes this table does not know).

    :param code: an ErrorCode value or an HTTP-only code; None reads as internal_error.
    """
    return STATUS_BY_CODE.get(code or ErrorCode.INTERNAL_ERROR.value, 500)


class APIError(Exception):
    """An error the HTTP layer itself answers with (auth, unknown routes).

    :param code: the body's error_code (its status comes from STATUS_BY_CODE).
    :param message: the body's error, for humans.
    :param headers: extra response headers (e.g. WWW-Authenticate).
    :param details: the body's details.
    """

    def __init__(
        self, code: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def error_response(
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> JSONResponse:
    """An ``{error, error_code, details}`` response.

    :param code: the error code; picks the status unless ``status`` is given.
    :param message: the error text, for humans.
    :param details: machine-readable extras; ``retry_after`` becomes Retry-After for
        the codes in RETRY_AFTER_CODES.
    :param headers: extra response headers; they win over Retry-After.
    :param status: the HTTP status, when it is not the code's (e.g. FastAPI's own errors).
    """
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
    # Retry-After is whole seconds; never 0, which would invite an immediate retry.
    return {"Retry-After": str(max(1, math.ceil(wait)))}


def result_response(result: ToolResult) -> JSONResponse:
    """A ToolResult as the body; the status from its error code (200 on success).

    :param result: the call's outcome; a timeout with ``details.task_id`` (we stopped
        waiting, the call may still run) also gets ``Location: /mcp/calls/{task_id}``.
    """
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


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Make every exception a route raises answer with the error body and its status.

    :param app: the FastAPI app to install the handlers on.
    :param settings: where Redis and the broker are, named (redacted) in 503 bodies.
    """

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc.code, exc.message, exc.details, exc.headers)

    async def on_mcp_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MCPError)
        return error_response(exc.code.value, exc.message, exc.details)

    def unreachable(service: str, url: str, exc: BaseException) -> Response:
        error = unreachable_error(service, url, exc)
        log.warning("%s", error.message)
        return error_response(error.code.value, error.message, error.details)

    async def on_redis_error(request: Request, exc: Exception) -> Response:
        return unreachable("state", settings.redis_url, exc)

    async def on_broker_error(request: Request, exc: Exception) -> Response:
        return unreachable("broker", settings.broker_url, exc)

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
        if exc.status_code == 400:
            # FastAPI's 400 for a body its JSON parser gave up on (nesting past
            # the recursion limit, an integer past Python's digit limit): a
            # malformed request like any other, 422 as documented.
            return error_response(
                ErrorCode.INVALID_ARGUMENTS.value,
                "invalid request: the body could not be parsed as JSON (nested too deeply, an integer "
                "with too many digits, or malformed)",
                status=422,
            )
        code = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 400: ErrorCode.INVALID_ARGUMENTS.value}.get(
            exc.status_code, HTTP_ERROR
        )
        return error_response(code, str(exc.detail), headers=dict(exc.headers or {}), status=exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Celery wraps some connection failures (RuntimeError from redis'
        # ConnectionError): still a 503, not a bug.
        if unreachable_cause(exc) is not None:
            return unreachable("broker_or_backend", settings.broker_url, exc)
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
