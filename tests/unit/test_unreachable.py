"""The producer's one predicate for "the broker or Redis could not be reached":
``is_unreachable`` and ``unreachable_cause`` (the HTTP API's) agree on every error."""

from __future__ import annotations

import pytest
import redis
from kombu.exceptions import OperationalError

from mcpq.worker.contract.unreachable import (
    UNREACHABLE,
    exception_chain,
    is_unreachable,
    unreachable_cause,
)

pytestmark = pytest.mark.timeout(10)


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


UNREACHABLE_ERRORS: list[BaseException] = [
    OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    redis.ConnectionError("Connection refused"),
    redis.TimeoutError("Timeout reading from socket"),
    ConnectionRefusedError(111, "Connection refused"),
    # Celery's Redis result consumer gives up like this:
    raised_from(RuntimeError("Retry limit exceeded while trying to reconnect"), redis.ConnectionError("x")),
    raised_from(RuntimeError("Retry limit exceeded"), redis.TimeoutError("slow")),
    raised_from(ValueError("wrapped twice"), raised_from(RuntimeError("r"), OperationalError("o"))),
]

REACHABLE_ERRORS: list[BaseException] = [
    RuntimeError("a bug in a callback"),
    ValueError("bad value"),
    redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    raised_from(RuntimeError("r"), KeyError("k")),
]


@pytest.mark.parametrize("exc", UNREACHABLE_ERRORS)
def test_unreachable(exc: BaseException) -> None:
    assert is_unreachable(exc)


@pytest.mark.parametrize("exc", REACHABLE_ERRORS)
def test_not_unreachable(exc: BaseException) -> None:
    assert not is_unreachable(exc)


def test_chain_stops_at_a_cycle() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert exception_chain(a) == [a, b]


@pytest.mark.parametrize("exc", UNREACHABLE_ERRORS)
def test_unreachable_cause_is_the_failure_in_the_chain(exc: BaseException) -> None:
    cause = unreachable_cause(exc)
    assert cause is not None and isinstance(cause, UNREACHABLE)
    assert any(cause is e for e in exception_chain(exc))


@pytest.mark.parametrize("exc", REACHABLE_ERRORS)
def test_no_unreachable_cause(exc: BaseException) -> None:
    assert unreachable_cause(exc) is None


@pytest.mark.parametrize("exc", UNREACHABLE_ERRORS + REACHABLE_ERRORS)
def test_both_answers_agree(exc: BaseException) -> None:
    # One tuple behind both: the queue and the HTTP API draw the same line.
    assert is_unreachable(exc) == (unreachable_cause(exc) is not None)


@pytest.mark.parametrize("kind", UNREACHABLE, ids=lambda t: t.__name__)
def test_every_kind_in_the_tuple_counts_also_when_wrapped(kind: type[BaseException]) -> None:
    inner = kind("cannot connect")
    assert unreachable_cause(inner) is inner
    assert unreachable_cause(raised_from(RuntimeError("Retry limit exceeded"), inner)) is inner


def test_the_outermost_failure_is_the_cause() -> None:
    # kombu's OperationalError raised from the socket's error: the broker's view is the cause.
    socket_error = ConnectionRefusedError(111, "Connection refused")
    broker = raised_from(OperationalError("Error 111 connecting"), socket_error)
    wrapped = raised_from(RuntimeError("wrapper"), broker)
    cause = unreachable_cause(wrapped)
    assert isinstance(cause, OperationalError) and cause is wrapped.__cause__


def test_the_implicit_context_is_searched_too() -> None:
    # `raise X` inside an `except` (no `from`) chains through __context__.
    try:
        try:
            raise redis.ConnectionError("lost")
        except redis.ConnectionError:
            raise RuntimeError("Retry limit exceeded")  # noqa: B904
    except RuntimeError as caught:
        wrapped = caught
    assert isinstance(unreachable_cause(wrapped), redis.ConnectionError)


def test_cause_search_stops_at_a_cycle() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert unreachable_cause(a) is None
    c = redis.TimeoutError("slow")
    b.__cause__ = c
    c.__cause__ = a
    assert unreachable_cause(a) is c


def test_unreachable_error_names_the_service_where_and_the_setting() -> None:
    import redis as redis_lib

    from mcpq.worker.contract.unreachable import unreachable_error

    wrapped = RuntimeError("Retry limit exceeded")
    wrapped.__cause__ = redis_lib.TimeoutError("Timeout reading from socket")
    error = unreachable_error("state", "redis://:pw-secret-7@h:6379/2", wrapped)
    assert error.code.value == "connection_error"
    assert error.message.startswith("cannot reach the state Redis at redis://:***@h:6379/2: ")
    assert "does not reply" in error.message and "MCPQ_REDIS_URL" in error.message
    assert "pw-secret-7" not in error.message and "Retry limit" not in error.message
    refused = unreachable_error("broker", "redis://h/0", redis_lib.AuthenticationError("invalid password"))
    assert "password (or user) was refused" in refused.message and "MCPQ_BROKER_URL" in refused.message
