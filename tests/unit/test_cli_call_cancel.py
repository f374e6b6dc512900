"""``mcpq call --progress``, Ctrl-C during ``mcpq call`` and ``mcpq cancel``
without a broker: what is shown, what is said, and the exit codes."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mcpq.producer.cancelling import CancelOutcome
from mcpq.producer.cli import cli
from mcpq.producer.cli_call import CallInterrupted, run_call
from mcpq.producer.cli_cancel import CancelRow
from mcpq.producer.cli_progress import BarProgress, LineProgress, counts, describe, progress_view
from mcpq.worker.contract.errors import CallNotFoundError
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult

pytestmark = pytest.mark.timeout(30)

CLEAN_ENV: dict[str, str | None] = {
    "MCPQ_CONFIG": None,
    "MCPQ_REDIS_URL": None,
    "MCPQ_BROKER_URL": None,
    "MCPQ_RESULT_BACKEND": None,
    "MCPQ_KEY_PREFIX": None,
}
DEAD = "redis://127.0.0.1:9"
UNREACHABLE = {
    "MCPQ_BROKER_URL": f"{DEAD}/0",
    "MCPQ_RESULT_BACKEND": f"{DEAD}/1",
    "MCPQ_REDIS_URL": f"{DEAD}/2",
}


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=CLEAN_ENV | (env or {}), prog_name="mcpq")


# --------------------------------------------------------------------------- progress


def test_progress_text() -> None:
    assert describe(ProgressUpdate(3, 10, "step 3 of 10")) == "progress 3/10 (30%) step 3 of 10"
    assert describe(ProgressUpdate(2.5, None, None)) == "progress 2.5"
    assert describe(ProgressUpdate(0, 0, "starting")) == "progress 0/0 starting"
    assert counts(ProgressUpdate(1, 4)) == "1/4"


def test_line_progress_prints_each_update_once() -> None:
    stream = io.StringIO()
    view = LineProgress(stream)
    for update in [ProgressUpdate(1, 2, "a"), ProgressUpdate(1, 2, "a"), ProgressUpdate(2, 2, "b")]:
        view.show(update)
    view.close()
    assert stream.getvalue() == "mcpq: progress 1/2 (50%) a\nmcpq: progress 2/2 (100%) b\n"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_lines_elsewhere() -> None:
    assert isinstance(progress_view("local/slow", io.StringIO()), LineProgress)
    terminal = FakeTerminal()
    view = progress_view("local/slow", terminal)
    assert isinstance(view, BarProgress)
    view.show(ProgressUpdate(3, 10, "step 3 of 10"))
    view.close()
    drawn = terminal.getvalue()
    assert "local/slow" in drawn and "3/10" in drawn and "step 3 of 10" in drawn


# --------------------------------------------------------------------------- Ctrl-C during call


def cancelled_result(may_have_run: bool) -> ToolResult:
    return ToolResult(
        success=False, tool_name="slow", error_code="cancelled", details={"may_have_run": may_have_run}
    )


class Handle:
    def __init__(self, outcome: Any) -> None:
        self._outcome = outcome
        self._async = SimpleNamespace(backend=None)  # release() leaves it alone
        self.id = "the-id"

    def result(self, timeout: float | None = None) -> ToolResult:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        result: ToolResult = self._outcome
        return result


class InterruptedQueue:
    """submit works, the wait is interrupted (Ctrl-C); then ``cancel`` and the
    final result answer as given."""

    def __init__(self, cancel: Any, final: Any = None) -> None:
        self._cancel = cancel
        self._final = final
        self.cancelled: list[str] = []
        self.settings = SimpleNamespace(broker_url="redis://x")
        self.submitted: dict[str, Any] = {}

    def submit(self, tool: str, arguments: dict[str, Any], **kw: Any) -> Handle:
        self.submitted = kw
        return Handle(KeyboardInterrupt())

    def cancel(self, task_id: str) -> CancelOutcome:
        self.cancelled.append(task_id)
        if isinstance(self._cancel, BaseException):
            raise self._cancel
        outcome: CancelOutcome = self._cancel(task_id)
        return outcome

    def get(self, task_id: str, tool: str = "?") -> Handle:
        return Handle(self._final)


def interrupted(queue: InterruptedQueue) -> CallInterrupted:
    with pytest.raises(CallInterrupted) as caught:
        run_call(queue, "slow", {}, view=LineProgress(io.StringIO()))  # type: ignore[arg-type]
    return caught.value


def test_ctrl_c_cancels_the_call_by_the_id_it_was_sent_with() -> None:
    queue = InterruptedQueue(lambda i: CancelOutcome(i, "requested"), cancelled_result(may_have_run=True))
    exc = interrupted(queue)
    assert queue.cancelled == [queue.submitted["request_id"]]  # chosen before sending
    assert queue.submitted["progress"] is True
    assert exc.result is not None and exc.result.error_code == "cancelled"
    assert exc.message.endswith("cancelled (it may have run)")


def test_ctrl_c_outcomes_other_than_cancelled() -> None:
    done = ToolResult.ok("slow", "s", {})
    finished = interrupted(InterruptedQueue(lambda i: CancelOutcome(i, "finished", done)))
    assert "had already finished" in finished.message and finished.result is done

    never_sent = interrupted(InterruptedQueue(CallNotFoundError("no call")))
    assert "before call" in never_sent.message and never_sent.result is None

    raced = interrupted(InterruptedQueue(lambda i: CancelOutcome(i, "requested"), done))
    assert "finished before the cancel reached it" in raced.message

    from mcpq.worker.contract.errors import MCPTimeoutError

    slow = interrupted(InterruptedQueue(lambda i: CancelOutcome(i, "requested"), MCPTimeoutError("late")))
    assert "no result within" in slow.message and "mcpq cancel" in slow.message


def test_call_progress_with_no_broker_exits_3() -> None:
    result = run("call", "slow", "--progress", env=UNREACHABLE)
    assert result.exit_code == 3, result.output
    assert '"error_code": "connection_error"' in result.stdout
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- mcpq cancel


def test_cancel_rows_say_what_happened() -> None:
    ok = CancelRow("a", "finished", ToolResult.ok("t", "s", {}))
    assert (ok.line(), ok.exit_code) == ("a finished ok", 0)
    failed = CancelRow("b", "finished", ToolResult(success=False, tool_name="t", error_code="tool_error"))
    assert failed.line() == "b finished tool_error"
    asked = CancelRow("c", "requested")
    assert (asked.line(), asked.exit_code) == ("c cancel requested", 0)
    assert asked.ended_line(3) == "c no result within 3s (the cancel stays requested)"
    asked.result = cancelled_result(may_have_run=False)
    assert asked.ended_line(3) == "c ended cancelled (it never ran)"
    assert asked.to_dict()["result"]["error_code"] == "cancelled"
    assert CancelRow("d", "requested", waited_in_vain=True).exit_code == 1
    bad = CancelRow("e", "error", error_code="invalid_arguments", error="'e' is not a call id")
    assert bad.exit_code == 2 and bad.to_dict()["error"] == "'e' is not a call id"
    assert CancelRow("f", "error", error_code="call_not_found").exit_code == 1


def test_cancel_needs_an_id() -> None:
    result = run("cancel")
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_a_malformed_id_is_refused_before_anything_is_asked() -> None:
    # Redis is unreachable: exit 2 (not 3) shows nothing was asked.
    result = run("cancel", "no such id!", env=UNREACHABLE)
    assert result.exit_code == 2, result.output
    assert "is not a call id" in result.stderr and "Traceback" not in result.output


def test_cancel_with_redis_unreachable_exits_3() -> None:
    result = run("cancel", "5f0c2a4e-0000-4000-8000-000000000000", env=UNREACHABLE)
    assert result.exit_code == 3, result.output
    assert "cannot reach" in result.stderr and "Traceback" not in result.output


def test_cancel_wait_must_be_seconds() -> None:
    result = run("cancel", "abc", "--wait", "nan")
    assert result.exit_code == 2 and "number of seconds" in result.output
