"""One answer, for every producer path, to "is this error an unreachable broker or Redis?"."""

from __future__ import annotations

import redis
from kombu.exceptions import OperationalError

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
