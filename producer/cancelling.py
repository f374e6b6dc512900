"""The rules of cancelling one call by id, shared by both faces.

``cancel(id)`` answers one of three ways, the same on ``ToolQueue`` and
``AsyncToolQueue``:

* the call has finished: :class:`CancelOutcome` ``state="finished"`` with its
  result; nothing changes (a finished call stays as it ended);
* the call is known and not finished (due in the ledger, or a non-final
  state in the result backend): the cancel flag is set and every worker told
  (contract/cancel.py); ``state="requested"``, no result yet. The call ends
  with a ``cancelled`` result when a worker reaches it (at once if running,
  when a worker takes its message if queued), unless it finishes first;
  only workers write results;
* neither: :class:`CallNotFoundError`, after waiting briefly
  (:data:`NOT_FOUND_WAIT`, on the result channel, never a blind sleep) for a
  result that is being stored right now: a call's ledger entry is cleared a
  moment before its result is written.

A malformed id is :class:`InvalidArgumentsError` before anything is asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from celery import states

from mcpq.producer.calls import task_result_to_tool_result
from mcpq.worker.contract.cancel import check_call_id
from mcpq.worker.contract.errors import CallNotFoundError, InvalidArgumentsError
from mcpq.worker.contract.result import ToolResult

#: Longest wait for the result of a call that is neither due nor finished (see above).
NOT_FOUND_WAIT = 0.5


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What ``cancel(id)`` did.

    ``state`` is ``"finished"`` (the call had ended; ``result`` is its
    ToolResult and nothing changed) or ``"requested"`` (the cancel was asked
    for; ``result`` is None and the call's own result, usually
    ``cancelled``, comes from its worker)."""

    id: str
    state: Literal["finished", "requested"]
    result: ToolResult | None = None


def checked_call_id(task_id: object) -> str:
    """``task_id`` if it can name a call, else InvalidArgumentsError saying why."""
    try:
        return check_call_id(task_id)
    except ValueError as exc:
        raise InvalidArgumentsError(str(exc), details={"field": "id"}) from None


def final_result(task_id: str, meta: dict[str, Any] | None, label: str = "?") -> ToolResult | None:
    """The call's ToolResult when ``meta`` (its decoded result-backend entry, or
    None) is a final state, else None."""
    if meta is None or meta.get("status") not in states.READY_STATES:
        return None
    return task_result_to_tool_result(label, task_id, str(meta["status"]), meta.get("result"))


def read_meta(backend: Any, task_id: str) -> dict[str, Any] | None:
    """Call ``task_id``'s decoded entry in the result backend, None when there is none."""
    if hasattr(backend, "get") and hasattr(backend, "get_key_for_task"):
        raw = backend.get(backend.get_key_for_task(task_id))
        return None if raw is None else dict(backend.decode_result(raw))
    meta = dict(backend.get_task_meta(task_id))  # backends without GET: PENDING means none
    return None if meta.get("status") == states.PENDING else meta


def cancel_step(
    task_id: str,
    read: Callable[[], dict[str, Any] | None],
    knows: Callable[[], bool],
    request: Callable[[], None],
) -> CancelOutcome | None:
    """Everything of a cancel but the final wait, blocking: an outcome, or None
    when the call is neither finished nor known (the caller then waits up to
    :data:`NOT_FOUND_WAIT` on the result channel it subscribed to *before*
    calling this, and raises :func:`not_found`).

    :param task_id: the call (already checked).
    :param read: reads its result-backend entry (:func:`read_meta`).
    :param knows: whether the ledger knows it (``Ledger.knows``).
    :param request: sets the cancel flag and tells workers (``request_cancel``).
    """
    meta = read()
    result = final_result(task_id, meta)
    if result is not None:
        return CancelOutcome(task_id, "finished", result)
    if meta is not None or knows():
        request()
        return CancelOutcome(task_id, "requested")
    result = final_result(task_id, read())  # it may have finished between the two reads
    if result is not None:
        return CancelOutcome(task_id, "finished", result)
    return None


def not_found(task_id: str) -> CallNotFoundError:
    """The error for an id that names no call this fleet knows."""
    return CallNotFoundError(
        f"no call {task_id!r} is known: it was never submitted, or its result has expired",
        details={"id": task_id},
    )
