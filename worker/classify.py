"""Turn whatever the MCP SDK raised into one error taxonomy.

The SDK's failures arrive in many shapes (see NOTES-mcp-sdk.md): nested
ExceptionGroups out of ``async with Client``, raw ``FileNotFoundError`` for a
missing stdio binary, ``httpx2`` errors for closed ports, ``MCPError`` with
JSON-RPC codes for everything the session saw. Each becomes an
:class:`Outcome` that says what the caller, the pool and the breaker need.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True, slots=True)
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


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def leaf_exception(exc: BaseException) -> BaseException:
    """The most telling exception inside (possibly nested) exception groups:
    an SDK error anywhere in the tree (it names the JSON-RPC failure), else the
    first that is not a cancellation (teardown noise), else the first."""
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


def classify(exc: BaseException, server: str, phase: Phase, timeout: float | None = None) -> Outcome:
    leaf = leaf_exception(exc)
    sent = phase == "call"
    where = f"server {server!r}"

    if isinstance(leaf, MCPError):
        # Already ours (raised by the pool, e.g. a connect timeout).
        transport = isinstance(leaf, MCPConnectionError | MCPTimeoutError)
        return Outcome(leaf, transport, transport, sent and transport, transport)

    if isinstance(leaf, SessionClosedBeforeSend):
        err: MCPError = MCPConnectionError(f"{where}: connection closed before the call was sent")
        return Outcome(err, True, True, False, True)

    if isinstance(leaf, SDKError):
        return _classify_jsonrpc(leaf, where, sent, timeout)

    if isinstance(leaf, TimeoutError | httpx2.TimeoutException):
        what = "connecting" if phase == "connect" else "the call"
        limit = f" within {timeout:g}s" if timeout else ""
        return Outcome(MCPTimeoutError(f"{where}: {what} did not finish{limit}"), True, True, sent, True)

    if isinstance(leaf, httpx2.HTTPStatusError):
        status = leaf.response.status_code
        if status >= 500:
            err = MCPConnectionError(f"{where}: HTTP {status} from the server")
            return Outcome(err, True, True, sent, True)
        hint = " (check the server's headers/credentials in config)" if status in (401, 403) else ""
        err = MCPConnectionError(f"{where}: HTTP {status} from the server{hint}")
        return Outcome(err, False, False, False, True)

    if isinstance(leaf, httpx2.ConnectError | ConnectionRefusedError):
        err = MCPConnectionError(f"{where}: cannot connect ({_describe(leaf)})")
        return Outcome(err, True, True, False, True)

    if isinstance(leaf, FileNotFoundError | PermissionError):
        err = MCPConnectionError(f"{where}: cannot start the stdio server ({_describe(leaf)})")
        return Outcome(err, True, True, False, True)

    if isinstance(leaf, httpx2.TransportError | OSError | EOFError):
        err = MCPConnectionError(f"{where}: connection failed ({_describe(leaf)})")
        return Outcome(err, True, True, sent, True)

    if isinstance(leaf, ValidationError):
        err = ProtocolError(
            f"{where}: answered with a message that is not valid MCP ({leaf.error_count()} errors)"
        )
        return Outcome(err, False, False, sent, False)

    err = InternalError(f"{where}: unexpected {_describe(leaf)}")
    return Outcome(err, False, False, sent, False)


def _classify_jsonrpc(exc: SDKError, where: str, sent: bool, timeout: float | None) -> Outcome:
    code, text = exc.code, exc.message
    err: MCPError
    if code == CONNECTION_CLOSED:
        return Outcome(MCPConnectionError(f"{where}: connection closed ({text})"), True, True, sent, True)
    if code == REQUEST_TIMEOUT:
        limit = f" within {timeout:g}s" if timeout else ""
        # The SDK sent a cancel notice and the session stays usable (NOTES-mcp-sdk.md #8).
        return Outcome(MCPTimeoutError(f"{where}: no answer{limit}"), True, True, sent, False)
    if code == INVALID_REQUEST and "session" in text.lower():
        # The server forgot the session (restart or idle expiry): it refused the
        # request without running it, so a fresh session may resend it.
        err = MCPConnectionError(f"{where}: session expired on the server ({text})")
        return Outcome(err, False, True, False, True)
    if code == INVALID_PARAMS:
        return Outcome(
            InvalidArgumentsError(f"{where} rejected the arguments: {text}"), False, False, False, False
        )
    if code == INTERNAL_ERROR:
        # The SDK's stand-in for an HTTP 5xx, or a JSON-RPC internal error:
        # both say the server is unwell.
        return Outcome(ProtocolError(f"{where}: server error ({text})"), True, True, sent, False)
    if code == UNSUPPORTED_PROTOCOL_VERSION:
        err = ProtocolError(f"{where}: no protocol version in common ({text}); set 'protocol' in config")
        return Outcome(err, False, False, False, True)
    if code == METHOD_NOT_FOUND:
        return Outcome(ProtocolError(f"{where}: method not supported ({text})"), False, False, False, False)
    return Outcome(ProtocolError(f"{where}: JSON-RPC error {code} ({text})"), False, False, sent, False)
