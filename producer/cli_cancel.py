"""``mcpq cancel ID...``: cancel calls by id through ``ToolQueue.cancel``.

Every id gets one row: ``finished`` (the call had ended; its result is
shown, nothing changed), ``requested`` (the cancel is asked for; with
``--wait`` the call's final result is waited for and shown) or ``error`` (a
malformed id: exit 2; an id no call has, ``call_not_found``: exit 1). Every
id is processed; the command exits with the worst code. A state Redis or
result backend that cannot be reached ends it at once
(``MCPConnectionError``, exit 3, raised to the caller).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery.result import AsyncResult

from mcpq.producer.queue import CallHandle, ToolQueue, release
from mcpq.worker.contract.errors import (
    CallNotFoundError,
    ErrorCode,
    InvalidArgumentsError,
    MCPTimeoutError,
)
from mcpq.worker.contract.result import ToolResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def outcome_word(result: ToolResult) -> str:
    """``ok`` for a success, else the result's error code."""
    return "ok" if result.success else (result.error_code or "failed")


@dataclass
class CancelRow:
    """What ``mcpq cancel`` did with one id."""

    task_id: str
    #: ``finished``, ``requested`` or ``error``
    state: str
    result: ToolResult | None = None
    error_code: str | None = None
    error: str | None = None
    #: ``--wait`` was given and this requested call had no result within it.
    waited_in_vain: bool = False

    @property
    def exit_code(self) -> int:
        if self.error_code == ErrorCode.INVALID_ARGUMENTS.value:
            return EXIT_USAGE
        if self.state == "error" or self.waited_in_vain:
            return EXIT_FAILED
        return EXIT_OK

    def line(self) -> str:
        """The row's line of text (errors say theirs on stderr instead)."""
        if self.state == "finished":
            assert self.result is not None
            return f"{self.task_id} finished {outcome_word(self.result)}"
        return f"{self.task_id} cancel requested"

    def ended_line(self, wait: float) -> str:
        """After ``--wait``: how the requested call ended, or that it had not yet."""
        if self.result is None:
            return f"{self.task_id} no result within {wait:g}s (the cancel stays requested)"
        text = f"{self.task_id} ended {outcome_word(self.result)}"
        if self.result.error_code == ErrorCode.CANCELLED.value:
            ran = self.result.details.get("may_have_run", True)
            text += " (it may have run)" if ran else " (it never ran)"
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "state": self.state,
            "result": None if self.result is None else self.result.to_dict(),
        }
        if self.state == "error":
            out["error_code"] = self.error_code
            out["error"] = self.error
        return out


def cancel_one(queue: ToolQueue, task_id: str) -> CancelRow:
    """Cancel one id. Raises MCPConnectionError when Redis cannot be reached."""
    try:
        outcome = queue.cancel(task_id)
    except (InvalidArgumentsError, CallNotFoundError) as exc:
        return CancelRow(task_id, "error", error_code=exc.code.value, error=exc.message)
    return CancelRow(task_id, outcome.state, outcome.result)


def cancel_all(queue: ToolQueue, ids: Sequence[str], on_row: Callable[[CancelRow], None]) -> list[CancelRow]:
    """Cancel every id in turn, handing each row to ``on_row`` as it is known."""
    rows = []
    for task_id in ids:
        row = cancel_one(queue, task_id)
        on_row(row)
        rows.append(row)
    return rows


def wait_for_ends(
    queue: ToolQueue, rows: Sequence[CancelRow], wait: float, on_end: Callable[[CancelRow], None]
) -> None:
    """Wait up to ``wait`` seconds (one deadline for all) for the final result
    of every requested call, filling in ``row.result`` and handing each row to
    ``on_end``."""
    deadline = time.monotonic() + wait
    for row in rows:
        if row.state != "requested":
            continue
        async_result = AsyncResult(row.task_id, app=queue.app)
        try:
            # At least a moment, so a call that already ended is still read.
            row.result = CallHandle(async_result, "?", queue=queue).result(
                max(deadline - time.monotonic(), 0.05)
            )
        except MCPTimeoutError:
            row.waited_in_vain = True
        finally:
            release(async_result)
        on_end(row)
