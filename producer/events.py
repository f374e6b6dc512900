"""What ``AsyncCallHandle.events()`` yields: small frozen values with a ``kind``.

A call's events come in this order: one ``status`` first (where the call
stands when you start listening), then ``status`` changes and ``progress``
(only for calls submitted with ``progress=True``) as they happen, and one
``result`` last; the iterator ends after it. Later issues add kinds, so match
on ``kind`` and ignore the ones you do not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from celery import states

from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult

#: The call is published and no worker has started it (or it is inside a chunk task).
QUEUED = "queued"
#: A worker is running it.
STARTED = "started"
#: It is waiting to be tried again (a retry, a limit, an open breaker).
RETRYING = "retrying"
#: It has its result.
FINISHED = "finished"

#: Celery task state -> status.
_BY_CELERY_STATE = {
    states.PENDING: QUEUED,
    states.RECEIVED: QUEUED,
    states.STARTED: STARTED,
    states.RETRY: RETRYING,
}


def status_of(celery_state: str) -> str:
    """The status for a Celery task state (final states: ``finished``)."""
    if celery_state in states.READY_STATES:
        return FINISHED
    return _BY_CELERY_STATE.get(celery_state, celery_state.lower())


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """Where the call stands: ``queued``, ``started``, ``retrying`` or ``finished``."""

    state: str
    kind: Literal["status"] = "status"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """The call's server reported ``progress`` (of ``total``, when known)."""

    progress: float
    total: float | None = None
    message: str | None = None
    kind: Literal["progress"] = "progress"

    @classmethod
    def of(cls, update: ProgressUpdate) -> ProgressEvent:
        return cls(update.progress, update.total, update.message)


@dataclass(frozen=True, slots=True)
class ResultEvent:
    """The call's final ToolResult: the last event."""

    result: ToolResult
    kind: Literal["result"] = "result"


CallEvent = StatusEvent | ProgressEvent | ResultEvent
