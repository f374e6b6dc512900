"""``mcpq call``'s wait: submit one call, wait for its result (showing its
progress when asked), and cancel it on Ctrl-C.

The call's id is chosen before it is sent, so Ctrl-C can cancel it wherever it
lands, even while the call is being published. The outcomes are the ones of
``ToolQueue.call``: a failure to enqueue or no result within the wait comes
back as a failed ToolResult (built by the same functions).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import redis

from mcpq.producer.cli_progress import POLL_INTERVAL, ProgressView
from mcpq.producer.queue import CallHandle, ToolQueue, release
from mcpq.producer.submission import call_label, not_enqueued_result, timed_out_result
from mcpq.worker.contract.errors import CallNotFoundError, ErrorCode, MCPError, MCPTimeoutError
from mcpq.worker.contract.result import ToolResult

#: After Ctrl-C, how long ``mcpq call`` waits for the cancelled call's own result.
CANCEL_WAIT = 5.0


class CallInterrupted(Exception):
    """Ctrl-C during ``mcpq call``: ``message`` says what became of the call,
    ``result`` is its final ToolResult when one came (usually ``cancelled``)."""

    def __init__(self, message: str, result: ToolResult | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


def run_call(
    queue: ToolQueue,
    tool: str,
    arguments: dict[str, Any],
    *,
    server: str | None = None,
    timeout: float | None = None,
    wait: float | None = None,
    view: ProgressView | None = None,
) -> ToolResult:
    """Submit ``tool`` and wait up to ``wait`` seconds (None: its deadline plus
    grace) for its result. With ``view``, the call asks for progress and every
    update is shown there while it waits.

    :raises CallInterrupted: on KeyboardInterrupt, after cancelling the call.
    :raises MCPConnectionError: the result backend was lost while waiting.
    """
    label = call_label(tool, server)
    task_id = str(uuid.uuid4())
    handle: CallHandle | None = None
    try:
        try:
            handle = queue.submit(
                tool, arguments, server=server, timeout=timeout, request_id=task_id, progress=view is not None
            )
        except Exception as exc:
            return not_enqueued_result(label, exc, None, queue.settings.broker_url)
        try:
            return _wait(queue, handle, wait, view)
        except MCPTimeoutError as exc:
            return timed_out_result(label, exc, None, handle.id)
    except KeyboardInterrupt:
        if view is not None:
            view.close()
            view = None
        raise cancel_after_interrupt(queue, task_id, label) from None
    finally:
        if view is not None:
            view.close()
        if handle is not None:
            release(handle._async)  # nobody reads this handle again


def _wait(queue: ToolQueue, handle: CallHandle, wait: float | None, view: ProgressView | None) -> ToolResult:
    if view is None:
        return handle.result(wait)
    done = threading.Event()
    poller = threading.Thread(
        target=_poll_progress, args=(queue, handle.id, view, done), name="mcpq-call-progress", daemon=True
    )
    poller.start()
    try:
        result = handle.result(wait)
    finally:
        done.set()
        poller.join(2 * POLL_INTERVAL + 5)
    # The worker writes the call's last update before its result: show it too.
    _show_latest(queue, handle.id, view)
    return result


def _poll_progress(queue: ToolQueue, task_id: str, view: ProgressView, done: threading.Event) -> None:
    while not done.wait(POLL_INTERVAL):
        _show_latest(queue, task_id, view)


def _show_latest(queue: ToolQueue, task_id: str, view: ProgressView) -> None:
    try:
        update = queue.progress_of(task_id)
    except (MCPError, redis.RedisError):
        return  # progress is best effort; the result says what happened
    if update is not None:
        view.show(update)


def cancel_after_interrupt(queue: ToolQueue, task_id: str, label: str) -> CallInterrupted:
    """Cancel call ``task_id`` after Ctrl-C and wait briefly (:data:`CANCEL_WAIT`)
    for its final result; says what became of it. A second Ctrl-C stops the wait."""
    try:
        outcome = queue.cancel(task_id)
    except CallNotFoundError:
        return CallInterrupted(f"interrupted before call {task_id} was sent")
    except (MCPError, redis.RedisError) as exc:
        return CallInterrupted(f"interrupted; could not cancel call {task_id}: {exc}")
    except KeyboardInterrupt:
        return CallInterrupted(f"interrupted again; call {task_id} may not be cancelled")
    if outcome.state == "finished":
        return CallInterrupted(f"interrupted; call {task_id} had already finished", outcome.result)
    follow = f"`mcpq cancel {task_id} --wait 30` follows it"
    handle = queue.get(task_id, label)
    try:
        result = handle.result(CANCEL_WAIT)
    except MCPTimeoutError:
        return CallInterrupted(
            f"interrupted; cancel of call {task_id} requested, no result within {CANCEL_WAIT:g}s ({follow})"
        )
    except KeyboardInterrupt:
        return CallInterrupted(f"interrupted; cancel of call {task_id} requested ({follow})")
    except (MCPError, redis.RedisError) as exc:
        return CallInterrupted(f"interrupted; cancel of call {task_id} requested ({exc})")
    finally:
        release(handle._async)
    if result.error_code == ErrorCode.CANCELLED.value:
        ran = "it may have run" if result.details.get("may_have_run", True) else "it never ran"
        return CallInterrupted(f"interrupted; call {task_id} cancelled ({ran})", result)
    return CallInterrupted(f"interrupted; call {task_id} finished before the cancel reached it", result)
