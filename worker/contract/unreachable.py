"""One answer, for every producer path, to "is this error an unreachable broker or Redis?",
and one way to say so."""

from __future__ import annotations

import socket

import redis
from kombu.exceptions import OperationalError

from mcpq.worker.contract.errors import MCPConnectionError
from mcpq.worker.contract.redact import redact_url, redact_urls_in

#: What "a server could not be reached" looks like: kombu's OperationalError (the
#: broker), redis' ConnectionError or TimeoutError (the state Redis, the result
#: backend), or a socket's OSError (refused, reset, no route, name not resolved).
#: The one tuple behind both ``is_unreachable`` and ``unreachable_cause``, so
#: every producer path (queue, fan-out, HTTP API) draws the line in the same place.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (``__cause__`` or ``__context__``), outermost first.

    :param exc: the exception to unwind; a cycle in the chain ends it.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def unreachable_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind ``exc`` (the outermost one of ``UNREACHABLE``
    in its chain), or None when nothing in the chain says a server was unreachable.

    Celery wraps some of them (its Redis result consumer gives up on a lost Redis
    with a RuntimeError, "Retry limit exceeded", chained to redis' ConnectionError),
    so the whole chain is searched, not just ``exc``.

    :param exc: the exception a producer call raised.
    """
    return next((e for e in exception_chain(exc) if isinstance(e, UNREACHABLE)), None)


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` or anything it was raised from says a server could not be
    reached (see ``UNREACHABLE`` and ``unreachable_cause``).

    :param exc: the exception a producer call raised.
    """
    return unreachable_cause(exc) is not None


#: What each service is called in messages, and the setting that points at it.
SERVICES: dict[str, tuple[str, str]] = {
    "broker": ("the broker", "MCPQ_BROKER_URL"),
    "backend": ("the result backend", "MCPQ_RESULT_BACKEND"),
    "broker_or_backend": ("the broker or the result backend", "MCPQ_BROKER_URL / MCPQ_RESULT_BACKEND"),
    "state": ("the state Redis", "MCPQ_REDIS_URL"),
}


def unreachable_error(service: str, url: str, exc: BaseException) -> MCPConnectionError:
    """The ``connection_error`` a person can act on: which service, where (password
    masked), what went wrong, and which setting to check.

    :param service: a key of :data:`SERVICES`.
    :param url: the service's URL (redacted here).
    :param exc: the failure; its unreachable cause is named, not Celery's wrapper.
    """
    name, setting = SERVICES[service]
    shown = redact_url(url)
    return MCPConnectionError(
        f"cannot reach {name} at {shown}: {describe_failure(unreachable_cause(exc) or exc)}; "
        f"check {setting} and that the server is up",
        details={"service": service, "url": shown},
    )


def describe_failure(exc: BaseException) -> str:
    """A connection failure in words: redis-py and kombu say "Timeout reading from
    socket" or, for a refused password, sometimes nothing useful at all."""
    if isinstance(exc, redis.AuthenticationError):
        return f"the password (or user) was refused: {exc}"
    if isinstance(exc, redis.TimeoutError | TimeoutError | socket.timeout):
        return f"no answer in time (the host accepts connections but does not reply): {exc}"
    text = redact_urls_in(str(exc)) or type(exc).__name__
    return text
