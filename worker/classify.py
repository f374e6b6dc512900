"""Turn whatever the MCP SDK raised into one error taxonomy.

The SDK's failures arrive in many shapes (see NOTES-mcp-sdk.md): nested
ExceptionGroups out of ``async with Client``, raw ``FileNotFoundError`` for a
missing stdio binary, ``httpx2`` errors for closed ports, ``MCPError`` with
JSON-RPC codes for everything the session saw. Each becomes an
:class:`Outcome` that says what the caller, the pool and the breaker need.

The module is a table, read like "Outcome classification" in
docs/architecture.md (and built like httpx's ``HTTPCORE_EXC_MAP``):

* a :class:`Kind` says what one kind of failure means: which mcpq error it
  becomes, whether it counts against the breaker, may be retried, may have run
  on the server, and breaks the session;
* :data:`BY_EXCEPTION`, :data:`BY_JSONRPC_CODE` and :data:`BY_HTTP_STATUS` map
  each failure shape (exception class, SDK JSON-RPC error code, HTTP status
  class) to a :class:`Rule`: its kind and the message it reads as;
* :func:`classify` unwraps the exception groups, finds the shape and builds
  the :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal

import httpx2
from mcp.shared.exceptions import MCPError as SDKError
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    UNSUPPORTED_PROTOCOL_VERSION,
)
from pydantic import ValidationError

from mcpq.worker.contract.errors import (
    InternalError,
    InvalidArgumentsError,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    ProtocolError,
)

Phase = Literal["connect", "call"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """A classified failure.

    ``breaker_failure``: counts against the server's health (DESIGN.md).
    ``retryable``: the same call may succeed later (transport trouble, 5xx, our deadline).
    ``maybe_executed``: the request may have reached the server, so a resend
    could run it twice.
    ``session_broken``: the session must be replaced before the next call.
    """

    error: MCPError
    breaker_failure: bool
    retryable: bool
    maybe_executed: bool
    session_broken: bool


class SessionClosedBeforeSend(Exception):
    """The pool found the session's transport closed before the request was written."""


# --------------------------------------------------------------------------- kinds

#: Whether the request may have run on the server: "if sent" means yes when
#: the failure happened during the call and no while connecting (nothing was
#: sent yet); "no" means the server cannot have run it either way.
MayHaveRun = Literal["no", "if sent"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Kind:
    """What one kind of failure means; the fields become the :class:`Outcome`'s.

    ``error``: the mcpq error class the failure becomes (rows that keep our
    own errors as raised name the class they keep).
    ``breaker_failure``, ``retryable``, ``session_broken``: as in :class:`Outcome`.
    ``may_have_run``: the rule for :attr:`Outcome.maybe_executed`.
    """

    error: type[MCPError]
    breaker_failure: bool
    retryable: bool
    may_have_run: MayHaveRun
    session_broken: bool


#: Nothing reached the server: connect refused, stdio binary missing, or the
#: pool saw the transport closed before it wrote the request.
CANNOT_CONNECT: Final = Kind(
    error=MCPConnectionError,
    breaker_failure=True,
    retryable=True,
    may_have_run="no",
    session_broken=True,
)
#: The transport failed under a request (closed mid-call, reset, HTTP 5xx):
#: the server is unwell and the request may have run.
TRANSPORT_FAILURE: Final = Kind(
    error=MCPConnectionError,
    breaker_failure=True,
    retryable=True,
    may_have_run="if sent",
    session_broken=True,
)
#: Our deadline (or an httpx timeout) cut the transport off mid-request, so
#: the session is left in an unknown state.
DEADLINE_PASSED: Final = Kind(
    error=MCPTimeoutError,
    breaker_failure=True,
    retryable=True,
    may_have_run="if sent",
    session_broken=True,
)
#: The SDK's own request timeout: it sent a cancel notice and the session
#: stays usable (NOTES-mcp-sdk.md #8).
NO_ANSWER: Final = Kind(
    error=MCPTimeoutError,
    breaker_failure=True,
    retryable=True,
    may_have_run="if sent",
    session_broken=False,
)
#: The server forgot the session (restart or idle expiry): it refused the
#: request without running it, so a fresh session may resend it. Not a health
#: problem: the server answered.
SESSION_EXPIRED: Final = Kind(
    error=MCPConnectionError,
    breaker_failure=False,
    retryable=True,
    may_have_run="no",
    session_broken=True,
)
#: The server refused the request at the HTTP level (4xx, bad credentials): a
#: config problem that no retry fixes, not a sign of ill health.
HTTP_REFUSED: Final = Kind(
    error=MCPConnectionError,
    breaker_failure=False,
    retryable=False,
    may_have_run="no",
    session_broken=True,
)
#: The server rejected the arguments before running the tool.
BAD_ARGUMENTS: Final = Kind(
    error=InvalidArgumentsError,
    breaker_failure=False,
    retryable=False,
    may_have_run="no",
    session_broken=False,
)
#: The SDK's stand-in for an HTTP 5xx, or a JSON-RPC internal error: both say
#: the server is unwell, but the session itself still works.
SERVER_ERROR: Final = Kind(
    error=ProtocolError,
    breaker_failure=True,
    retryable=True,
    may_have_run="if sent",
    session_broken=False,
)
#: The handshake found no protocol version both sides speak; only config
#: ('protocol') fixes that, and this session is unusable.
NO_COMMON_PROTOCOL: Final = Kind(
    error=ProtocolError,
    breaker_failure=False,
    retryable=False,
    may_have_run="no",
    session_broken=True,
)
#: The server does not implement the method, so nothing ran.
UNSUPPORTED_METHOD: Final = Kind(
    error=ProtocolError,
    breaker_failure=False,
    retryable=False,
    may_have_run="no",
    session_broken=False,
)
#: An answer that is not valid MCP, or a JSON-RPC error we have no row for:
#: the server is reachable but speaks oddly; repeating will not help.
NOT_MCP: Final = Kind(
    error=ProtocolError,
    breaker_failure=False,
    retryable=False,
    may_have_run="if sent",
    session_broken=False,
)
#: Anything else (including cancellations we caused): mcpq's own fault, so
#: not the server's health and not worth a retry.
UNEXPECTED: Final = Kind(
    error=InternalError,
    breaker_failure=False,
    retryable=False,
    may_have_run="if sent",
    session_broken=False,
)
#: One of our own errors that is not about the transport (e.g. arguments the
#: pool rejected): raised before anything was sent.
OWN_ERROR: Final = Kind(
    error=MCPError,
    breaker_failure=False,
    retryable=False,
    may_have_run="no",
    session_broken=False,
)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: a failure shape's :class:`Kind` and message.

    ``message`` is a :meth:`str.format` template over the facts :func:`classify`
    gathers: ``where`` (``server 'name'``), ``what`` (``connecting`` / ``the
    call``), ``limit`` (`` within 5s`` or empty), ``detail`` (the leaf's class
    and text), ``errors`` (a ValidationError's count), ``code`` / ``text`` (an
    SDK error's JSON-RPC code and message), ``status`` (an HTTP status).
    :data:`KEEP_AS_RAISED` instead keeps our own error, class and wording.
    """

    kind: Kind
    message: str | None


KEEP_AS_RAISED: Final = None

_DID_NOT_FINISH = "{where}: {what} did not finish{limit}"
_CANNOT_CONNECT = "{where}: cannot connect ({detail})"
_CANNOT_START = "{where}: cannot start the stdio server ({detail})"
_CONNECTION_FAILED = "{where}: connection failed ({detail})"
_HTTP_STATUS = "{where}: HTTP {status} from the server"

#: Exception class -> row. The most specific class in the leaf's MRO wins (as
#: httpx maps to the most specific class), so ConnectionRefusedError and
#: TimeoutError, both OSErrors, need no ordering against OSError.
BY_EXCEPTION: Final[dict[type[BaseException], Rule]] = {
    # Already ours (raised by the pool, e.g. a connect timeout): keep them. Our
    # connection and timeout errors are transport trouble like the SDK's; any
    # other error of ours was raised before the request went out.
    MCPConnectionError: Rule(TRANSPORT_FAILURE, KEEP_AS_RAISED),
    MCPTimeoutError: Rule(DEADLINE_PASSED, KEEP_AS_RAISED),
    MCPError: Rule(OWN_ERROR, KEEP_AS_RAISED),
    SessionClosedBeforeSend: Rule(CANNOT_CONNECT, "{where}: connection closed before the call was sent"),
    TimeoutError: Rule(DEADLINE_PASSED, _DID_NOT_FINISH),
    httpx2.TimeoutException: Rule(DEADLINE_PASSED, _DID_NOT_FINISH),
    httpx2.ConnectError: Rule(CANNOT_CONNECT, _CANNOT_CONNECT),
    ConnectionRefusedError: Rule(CANNOT_CONNECT, _CANNOT_CONNECT),
    FileNotFoundError: Rule(CANNOT_CONNECT, _CANNOT_START),
    PermissionError: Rule(CANNOT_CONNECT, _CANNOT_START),
    httpx2.TransportError: Rule(TRANSPORT_FAILURE, _CONNECTION_FAILED),
    OSError: Rule(TRANSPORT_FAILURE, _CONNECTION_FAILED),
    EOFError: Rule(TRANSPORT_FAILURE, _CONNECTION_FAILED),
    ValidationError: Rule(
        NOT_MCP, "{where}: answered with a message that is not valid MCP ({errors} errors)"
    ),
}
#: A leaf no class in :data:`BY_EXCEPTION` covers.
UNEXPECTED_EXCEPTION: Final = Rule(UNEXPECTED, "{where}: unexpected {detail}")

#: The SDK reports an unknown session as a plain -32600 (INVALID_REQUEST);
#: only its message tells it apart, so it gets a shape of its own.
SESSION_NOT_FOUND: Final = "session not found"
JsonRpcShape = int | Literal["session not found"]

#: SDK error (JSON-RPC code) -> row.
BY_JSONRPC_CODE: Final[dict[JsonRpcShape, Rule]] = {
    CONNECTION_CLOSED: Rule(TRANSPORT_FAILURE, "{where}: connection closed ({text})"),
    REQUEST_TIMEOUT: Rule(NO_ANSWER, "{where}: no answer{limit}"),
    SESSION_NOT_FOUND: Rule(SESSION_EXPIRED, "{where}: session expired on the server ({text})"),
    INVALID_PARAMS: Rule(BAD_ARGUMENTS, "{where} rejected the arguments: {text}"),
    INTERNAL_ERROR: Rule(SERVER_ERROR, "{where}: server error ({text})"),
    UNSUPPORTED_PROTOCOL_VERSION: Rule(
        NO_COMMON_PROTOCOL, "{where}: no protocol version in common ({text}); set 'protocol' in config"
    ),
    METHOD_NOT_FOUND: Rule(UNSUPPORTED_METHOD, "{where}: method not supported ({text})"),
}
#: Any other code, including a -32600 that is not about the session.
OTHER_JSONRPC_CODE: Final = Rule(NOT_MCP, "{where}: JSON-RPC error {code} ({text})")

#: ``5xx``; ``401/403`` (credentials); ``4xx``: anything else below 500, which
#: includes the odd 1xx/3xx an HTTPStatusError can carry.
HttpStatusClass = Literal["5xx", "401/403", "4xx"]

#: httpx2.HTTPStatusError (status class) -> row.
BY_HTTP_STATUS: Final[dict[HttpStatusClass, Rule]] = {
    "5xx": Rule(TRANSPORT_FAILURE, _HTTP_STATUS),
    "401/403": Rule(HTTP_REFUSED, _HTTP_STATUS + " (check the server's headers/credentials in config)"),
    "4xx": Rule(HTTP_REFUSED, _HTTP_STATUS),
}


# --------------------------------------------------------------------------- finding the shape


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def leaf_exception(exc: BaseException) -> BaseException:
    """The most telling exception inside (possibly nested) exception groups.

    :param exc: what the SDK (or the pool) raised; a plain exception is its own leaf.
    :returns: an SDK error anywhere in the tree (it names the JSON-RPC failure),
        else the first leaf that is not a cancellation (teardown noise), else the first.
    """
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, SDKError):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _jsonrpc_shape(exc: SDKError) -> JsonRpcShape:
    if exc.code == INVALID_REQUEST and "session" in exc.message.lower():
        return SESSION_NOT_FOUND
    return exc.code


def _status_class(status: int) -> HttpStatusClass:
    if status >= 500:
        return "5xx"
    if status in (401, 403):
        return "401/403"
    return "4xx"


def _by_class(leaf: BaseException) -> Rule:
    for cls in type(leaf).__mro__:
        rule = BY_EXCEPTION.get(cls)
        if rule is not None:
            return rule
    return UNEXPECTED_EXCEPTION


def _find(leaf: BaseException) -> tuple[Rule, dict[str, object]]:
    """The row for ``leaf``'s shape, and the shape's facts its message quotes."""
    if isinstance(leaf, SDKError):
        return BY_JSONRPC_CODE.get(_jsonrpc_shape(leaf), OTHER_JSONRPC_CODE), {
            "code": leaf.code,
            "text": leaf.message,
        }
    if isinstance(leaf, httpx2.HTTPStatusError):
        status = leaf.response.status_code
        return BY_HTTP_STATUS[_status_class(status)], {"status": status}
    facts: dict[str, object] = {"detail": _describe(leaf)}
    if isinstance(leaf, ValidationError):
        facts["errors"] = leaf.error_count()
    return _by_class(leaf), facts


def classify(exc: BaseException, server: str, phase: Phase, timeout: float | None = None) -> Outcome:
    """Classify one failure of a connect or a call.

    :param exc: what was raised, possibly the SDK's nested exception groups.
    :param server: the server's configured name, quoted in the error message.
    :param phase: ``"connect"`` while opening the session (nothing was sent, so
        nothing may have run) or ``"call"`` once the request may have been written.
    :param timeout: the limit that applied, in seconds, named in timeout messages;
        ``None`` or 0 names none.
    :returns: the :class:`Outcome`; its error is a fresh mcpq error, or ``exc``'s
        leaf itself when that already is one.
    """
    leaf = leaf_exception(exc)
    rule, facts = _find(leaf)
    kind = rule.kind
    error: MCPError
    if rule.message is None:
        # Only rows keyed by our own error classes keep the leaf, so it is one.
        assert isinstance(leaf, MCPError), f"no message for {type(leaf).__name__}"
        error = leaf
    else:
        error = kind.error(
            rule.message.format_map(
                {
                    "where": f"server {server!r}",
                    "what": "connecting" if phase == "connect" else "the call",
                    "limit": f" within {timeout:g}s" if timeout else "",
                    **facts,
                }
            )
        )
    return Outcome(
        error=error,
        breaker_failure=kind.breaker_failure,
        retryable=kind.retryable,
        maybe_executed=phase == "call" and kind.may_have_run == "if sent",
        session_broken=kind.session_broken,
    )
