"""mcpq.worker.classify: every failure shape the SDK produces -> one Outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
import pytest
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
from pydantic import BaseModel, ValidationError

from mcpq.worker.classify import (
    BY_EXCEPTION,
    BY_HTTP_STATUS,
    BY_JSONRPC_CODE,
    OTHER_JSONRPC_CODE,
    UNEXPECTED_EXCEPTION,
    Outcome,
    SessionClosedBeforeSend,
    classify,
    leaf_exception,
)
from mcpq.worker.contract.errors import (
    ErrorCode,
    InternalError,
    InvalidArgumentsError,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    ProtocolError,
)

pytestmark = pytest.mark.timeout(30)

SERVER = "srv-1"
WHERE = f"server {SERVER!r}"


def http_status(status: int) -> httpx2.HTTPStatusError:
    request = httpx2.Request("POST", "http://h/mcp")
    response = httpx2.Response(status, request=request)
    return httpx2.HTTPStatusError(f"status {status}", request=request, response=response)


class _Point(BaseModel):
    x: int
    y: int


def validation_error() -> ValidationError:
    try:
        _Point.model_validate({"x": "not-a-number"})  # two errors: x is not an int, y is missing
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a ValidationError")


@dataclass(frozen=True)
class Case:
    """What classify must say for one exception, in both phases."""

    id: str
    make: Callable[[], BaseException]
    cls: type[MCPError]
    code: ErrorCode
    breaker_failure: bool
    retryable: bool
    #: maybe_executed when the failure happened during the call (connect is always False here).
    maybe_executed_on_call: bool
    session_broken: bool
    fragment: str


CASES = [
    Case(
        "sdk-connection-closed",
        lambda: SDKError(CONNECTION_CLOSED, "Connection closed"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        True,
        True,
        "connection closed (Connection closed)",
    ),
    Case(
        "sdk-request-timeout",
        lambda: SDKError(REQUEST_TIMEOUT, "Request timed out"),
        MCPTimeoutError,
        ErrorCode.TIMEOUT,
        True,
        True,
        True,
        False,
        "no answer within 5s",
    ),
    Case(
        "sdk-session-not-found",
        lambda: SDKError(INVALID_REQUEST, "Session not found"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        False,
        True,
        False,
        True,
        "session expired on the server (Session not found)",
    ),
    Case(
        "sdk-invalid-request-other",
        lambda: SDKError(INVALID_REQUEST, "Bad request: missing id"),
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        False,
        False,
        True,
        False,
        f"JSON-RPC error {INVALID_REQUEST} (Bad request: missing id)",
    ),
    Case(
        "sdk-invalid-params",
        lambda: SDKError(INVALID_PARAMS, "a must be an integer"),
        InvalidArgumentsError,
        ErrorCode.INVALID_ARGUMENTS,
        False,
        False,
        False,
        False,
        "rejected the arguments: a must be an integer",
    ),
    Case(
        "sdk-internal-error",
        lambda: SDKError(INTERNAL_ERROR, "database down"),
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        True,
        True,
        True,
        False,
        "server error (database down)",
    ),
    Case(
        "sdk-method-not-found",
        lambda: SDKError(METHOD_NOT_FOUND, "Method not found"),
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        False,
        False,
        False,
        False,
        "method not supported (Method not found)",
    ),
    Case(
        "sdk-unsupported-protocol",
        lambda: SDKError(UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version"),
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        False,
        False,
        False,
        True,
        "no protocol version in common (Unsupported protocol version); set 'protocol' in config",
    ),
    Case(
        "sdk-other-code",
        lambda: SDKError(-31999, "custom failure"),
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        False,
        False,
        True,
        False,
        "JSON-RPC error -31999 (custom failure)",
    ),
    Case(
        "httpx-connect-error",
        lambda: httpx2.ConnectError("x"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        False,
        True,
        "cannot connect (ConnectError: x)",
    ),
    Case(
        "connection-refused",
        lambda: ConnectionRefusedError(111, "Connection refused"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        False,
        True,
        "cannot connect (ConnectionRefusedError:",
    ),
    Case(
        "http-503",
        lambda: http_status(503),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        True,
        True,
        "HTTP 503 from the server",
    ),
    Case(
        "http-401",
        lambda: http_status(401),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        False,
        False,
        False,
        True,
        "HTTP 401 from the server (check the server's headers/credentials in config)",
    ),
    Case(
        "http-404",
        lambda: http_status(404),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        False,
        False,
        False,
        True,
        "HTTP 404 from the server",
    ),
    Case(
        "file-not-found",
        lambda: FileNotFoundError(2, "No such file or directory", "no-such-mcp-binary"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        False,
        True,
        "cannot start the stdio server (FileNotFoundError:",
    ),
    Case(
        "permission-denied",
        lambda: PermissionError(13, "Permission denied", "/bin/not-executable"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        False,
        True,
        "cannot start the stdio server (PermissionError:",
    ),
    Case(
        "httpx-read-error",
        lambda: httpx2.ReadError("peer went away"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        True,
        True,
        "connection failed (ReadError: peer went away)",
    ),
    Case(
        "connection-reset",
        lambda: ConnectionResetError(104, "Connection reset by peer"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        True,
        True,
        "connection failed (ConnectionResetError:",
    ),
    Case(
        "eof",
        lambda: EOFError(),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        True,
        True,
        "connection failed (EOFError)",
    ),
    Case(
        "validation-error",
        validation_error,
        ProtocolError,
        ErrorCode.PROTOCOL_ERROR,
        False,
        False,
        True,
        False,
        "answered with a message that is not valid MCP (2 errors)",
    ),
    Case(
        "session-closed-before-send",
        lambda: SessionClosedBeforeSend("closed"),
        MCPConnectionError,
        ErrorCode.CONNECTION_ERROR,
        True,
        True,
        False,
        True,
        "connection closed before the call was sent",
    ),
    Case(
        "unexpected",
        lambda: RuntimeError("boom"),
        InternalError,
        ErrorCode.INTERNAL_ERROR,
        False,
        False,
        True,
        False,
        "unexpected RuntimeError: boom",
    ),
    Case(
        "unexpected-no-text",
        lambda: KeyError(),
        InternalError,
        ErrorCode.INTERNAL_ERROR,
        False,
        False,
        True,
        False,
        "unexpected KeyError",
    ),
]


def check(outcome: Outcome, case: Case, maybe_executed: bool) -> None:
    assert type(outcome.error) is case.cls
    assert outcome.error.code == case.code
    assert outcome.breaker_failure is case.breaker_failure
    assert outcome.retryable is case.retryable
    assert outcome.maybe_executed is maybe_executed
    assert outcome.session_broken is case.session_broken
    assert outcome.error.message.startswith(WHERE), outcome.error.message
    assert case.fragment in outcome.error.message, outcome.error.message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_call_phase(case: Case) -> None:
    check(classify(case.make(), SERVER, "call", timeout=5), case, case.maybe_executed_on_call)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_connect_phase_never_maybe_executed(case: Case) -> None:
    # Nothing was sent during connect, so nothing can have run twice.
    check(classify(case.make(), SERVER, "connect", timeout=5), case, False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_doubly_nested_group_classifies_like_its_leaf(case: Case) -> None:
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [case.make()])])
    check(classify(group, SERVER, "call", timeout=5), case, case.maybe_executed_on_call)


def test_outcome_is_frozen() -> None:
    outcome = classify(httpx2.ConnectError("x"), SERVER, "call")
    with pytest.raises(AttributeError):
        outcome.retryable = False  # type: ignore[misc]


def test_outcome_takes_keywords_only() -> None:
    # Four positional booleans are too easy to swap.
    with pytest.raises(TypeError):
        Outcome(InternalError("x"), False, False, False, False)  # type: ignore[misc]
    outcome = Outcome(
        error=InternalError("x"),
        breaker_failure=False,
        retryable=True,
        maybe_executed=False,
        session_broken=True,
    )
    assert (outcome.retryable, outcome.session_broken) == (True, True)


# --------------------------------------------------------------------------- the table


def test_only_our_own_error_classes_keep_the_error() -> None:
    # classify keeps the leaf as the Outcome's error only for these rows; any
    # other row without a message would have no error to give.
    kept = [cls for cls, rule in BY_EXCEPTION.items() if rule.message is None]
    assert kept and all(issubclass(cls, MCPError) for cls in kept)
    others = [*BY_JSONRPC_CODE.values(), *BY_HTTP_STATUS.values(), OTHER_JSONRPC_CODE, UNEXPECTED_EXCEPTION]
    assert all(rule.message is not None for rule in others)


@pytest.mark.parametrize(
    ("status", "breaker_failure", "hint"),
    [(500, True, False), (599, True, False), (499, False, False), (403, False, True), (302, False, False)],
)
def test_http_status_classes(status: int, breaker_failure: bool, hint: bool) -> None:
    outcome = classify(http_status(status), SERVER, "call")
    assert type(outcome.error) is MCPConnectionError
    assert outcome.breaker_failure is breaker_failure
    assert outcome.retryable is breaker_failure
    assert outcome.maybe_executed is breaker_failure
    assert outcome.session_broken is True
    assert ("credentials" in outcome.error.message) is hint


def test_session_not_found_is_matched_case_insensitively() -> None:
    outcome = classify(SDKError(INVALID_REQUEST, "Unknown SESSION id"), SERVER, "call")
    assert (outcome.breaker_failure, outcome.retryable, outcome.maybe_executed) == (False, True, False)
    assert "session expired on the server" in outcome.error.message


def test_message_quotes_sdk_text_with_braces_verbatim() -> None:
    # The rows are format templates; the SDK's text is a value, never a template.
    outcome = classify(SDKError(-31999, "bad {field}"), SERVER, "call")
    assert outcome.error.message == f"{WHERE}: JSON-RPC error -31999 (bad {{field}})"


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "exc", [TimeoutError(), httpx2.ReadTimeout("read timed out")], ids=["builtin", "httpx"]
)
def test_timeout_while_connecting(exc: BaseException) -> None:
    outcome = classify(exc, SERVER, "connect", timeout=2.5)
    assert type(outcome.error) is MCPTimeoutError
    assert outcome.error.code == ErrorCode.TIMEOUT
    assert outcome.error.message == f"{WHERE}: connecting did not finish within 2.5s"
    assert (outcome.breaker_failure, outcome.retryable, outcome.maybe_executed, outcome.session_broken) == (
        True,
        True,
        False,
        True,
    )


@pytest.mark.parametrize(
    "exc", [TimeoutError(), httpx2.ReadTimeout("read timed out")], ids=["builtin", "httpx"]
)
def test_timeout_during_call(exc: BaseException) -> None:
    outcome = classify(exc, SERVER, "call", timeout=7)
    assert type(outcome.error) is MCPTimeoutError
    assert outcome.error.message == f"{WHERE}: the call did not finish within 7s"
    assert (outcome.breaker_failure, outcome.retryable, outcome.maybe_executed, outcome.session_broken) == (
        True,
        True,
        True,
        True,
    )


def test_timeout_without_limit_names_no_limit() -> None:
    assert classify(TimeoutError(), SERVER, "call").error.message == f"{WHERE}: the call did not finish"
    sdk = SDKError(REQUEST_TIMEOUT, "Request timed out")
    assert classify(sdk, SERVER, "call").error.message == f"{WHERE}: no answer"


# --------------------------------------------------------------------------- errors that are already ours


@pytest.mark.parametrize("phase", ["connect", "call"])
@pytest.mark.parametrize(
    ("error", "transport"),
    [
        (MCPTimeoutError("pool: connect timed out"), True),
        (MCPConnectionError("pool: gave up reconnecting"), True),
        (InvalidArgumentsError("bad"), False),
        (ProtocolError("odd"), False),
    ],
    ids=["timeout", "connection", "invalid-args", "protocol"],
)
def test_our_own_errors_pass_through(error: MCPError, transport: bool, phase: str) -> None:
    outcome = classify(ExceptionGroup("g", [error]), SERVER, phase)  # type: ignore[arg-type]
    assert outcome.error is error
    assert outcome.error.message == error.message  # not re-worded
    assert outcome.breaker_failure is transport
    assert outcome.retryable is transport
    assert outcome.session_broken is transport
    assert outcome.maybe_executed is (transport and phase == "call")


# --------------------------------------------------------------------------- groups and leaf_exception


def test_leaf_of_plain_exception_is_itself() -> None:
    exc = ValueError("v")
    assert leaf_exception(exc) is exc


def test_leaf_descends_nested_groups() -> None:
    sdk = SDKError(CONNECTION_CLOSED, "Connection closed")
    assert leaf_exception(ExceptionGroup("", [ExceptionGroup("", [sdk])])) is sdk


def test_leaf_skips_cancellation() -> None:
    connect = httpx2.ConnectError("refused")
    group = BaseExceptionGroup("", [asyncio.CancelledError(), connect])
    assert leaf_exception(group) is connect
    outcome = classify(group, SERVER, "connect")
    assert type(outcome.error) is MCPConnectionError
    assert outcome.breaker_failure is True
    assert "cannot connect (ConnectError: refused)" in outcome.error.message


def test_leaf_of_only_cancellation_is_the_cancellation() -> None:
    cancelled = asyncio.CancelledError()
    group = BaseExceptionGroup("", [cancelled])
    assert leaf_exception(group) is cancelled
    # Cancellation we caused is not the server's fault.
    outcome = classify(group, SERVER, "call")
    assert outcome.breaker_failure is False
    assert outcome.retryable is False


def test_leaf_prefers_sdk_error_over_teardown_noise() -> None:
    sdk = SDKError(INVALID_PARAMS, "x must be a number")
    group = ExceptionGroup("", [RuntimeError("teardown"), OSError("pipe closed"), sdk])
    assert leaf_exception(group) is sdk
    outcome = classify(group, SERVER, "call")
    assert type(outcome.error) is InvalidArgumentsError
    assert outcome.breaker_failure is False


def test_leaf_prefers_nested_group_holding_sdk_error() -> None:
    sdk = SDKError(INTERNAL_ERROR, "boom")
    group = ExceptionGroup("", [ValueError("noise"), ExceptionGroup("", [sdk])])
    assert leaf_exception(group) is sdk


def test_leaf_without_sdk_error_takes_the_first() -> None:
    first, second = ValueError("a"), KeyError("b")
    assert leaf_exception(ExceptionGroup("", [first, second])) is first


def test_group_mixing_cancellation_and_sdk_error() -> None:
    sdk = SDKError(CONNECTION_CLOSED, "Connection closed")
    group = BaseExceptionGroup("", [asyncio.CancelledError(), ExceptionGroup("", [sdk])])
    outcome = classify(group, SERVER, "call")
    assert type(outcome.error) is MCPConnectionError
    assert outcome.maybe_executed is True
    assert outcome.session_broken is True


def test_sdk_error_beats_noise_in_an_earlier_nested_group() -> None:
    sdk = SDKError(INVALID_PARAMS, "x must be a number")
    group = ExceptionGroup("", [ExceptionGroup("", [RuntimeError("teardown")]), sdk])
    assert leaf_exception(group) is sdk


def test_connect_error_beats_nested_cancellation_group() -> None:
    connect = httpx2.ConnectError("refused")
    group = BaseExceptionGroup("", [BaseExceptionGroup("", [asyncio.CancelledError()]), connect])
    outcome = classify(group, SERVER, "connect")
    assert type(outcome.error) is MCPConnectionError
    assert outcome.breaker_failure is True
