"""One answer, for every producer path, to "is this error an unreachable broker or Redis?"."""

from __future__ import annotations

import redis
from kombu.exceptions import OperationalError


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (``__cause__`` or ``__context__``), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` or anything it was raised from says a server could not be
    reached: kombu's OperationalError, redis' ConnectionError or TimeoutError, or
    a socket's OSError. Celery's Redis result consumer gives up on a lost Redis
    with a RuntimeError ("Retry limit exceeded") chained to one of these."""
    unreachable = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)
    return any(isinstance(e, unreachable) for e in exception_chain(exc))
