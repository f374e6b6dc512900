"""The producer's one predicate for "the broker or Redis could not be reached"."""

from __future__ import annotations

import pytest
import redis
from kombu.exceptions import OperationalError

from mcpq.worker.contract.unreachable import exception_chain, is_unreachable

pytestmark = pytest.mark.timeout(10)


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis.ConnectionError("Connection refused"),
        redis.TimeoutError("Timeout reading from socket"),
        ConnectionRefusedError(111, "Connection refused"),
        # Celery's Redis result consumer gives up like this:
        raised_from(
            RuntimeError("Retry limit exceeded while trying to reconnect"), redis.ConnectionError("x")
        ),
        raised_from(RuntimeError("Retry limit exceeded"), redis.TimeoutError("slow")),
        raised_from(ValueError("wrapped twice"), raised_from(RuntimeError("r"), OperationalError("o"))),
    ],
)
def test_unreachable(exc: BaseException) -> None:
    assert is_unreachable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("a bug in a callback"),
        ValueError("bad value"),
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        raised_from(RuntimeError("r"), KeyError("k")),
    ],
)
def test_not_unreachable(exc: BaseException) -> None:
    assert not is_unreachable(exc)


def test_chain_stops_at_a_cycle() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert exception_chain(a) == [a, b]
