"""``mcpq batch`` and Ctrl-C without a broker: the resume rule for cancelled
lines, what an interrupted run writes, the publisher that knows what to
cancel, and SIGINT handling. The fan-out itself is faked."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mcpq.producer import batch as batch_mod
from mcpq.producer import fanout
from mcpq.producer.batch import ResultsState, read_results, result_line, run_batch
from mcpq.producer.calls import Call
from mcpq.producer.cli import cli
from mcpq.producer.cli_batch_cancel import CancellingPublisher, Interrupt, sigint_sets
from mcpq.worker.contract.result import ToolResult
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(30)

CLEAN_ENV: dict[str, str | None] = {
    "MCPQ_CONFIG": None,
    "MCPQ_REDIS_URL": None,
    "MCPQ_BROKER_URL": None,
    "MCPQ_RESULT_BACKEND": None,
    "MCPQ_KEY_PREFIX": None,
}


def answer(n: int, *, success: bool = True, code: str | None = None, **details: Any) -> str:
    return result_line(n, ToolResult(success=success, tool_name="t", error_code=code, details=details))


def cancelled(n: int, may_have_run: bool | None) -> str:
    if may_have_run is None:
        return answer(n, success=False, code="cancelled")
    return answer(n, success=False, code="cancelled", may_have_run=may_have_run)


def call_line(n: int) -> str:
    return json.dumps({"tool": "t", "arguments": {"n": n}})


def rows(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert row["line"] not in out, f"line {row['line']} answered twice"
        out[row["line"]] = row
    return out


# --------------------------------------------------------------------------- the resume rule


def test_the_resume_rule_for_every_kind_of_answer(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(
        answer(1)
        + answer(2, success=False, code="tool_error")
        + cancelled(3, may_have_run=False)
        + cancelled(4, may_have_run=True)
        + cancelled(5, may_have_run=None)  # no details: it may have run, as far as anyone knows
        + cancelled(6, may_have_run=False)
        + answer(6)  # re-run later: the last answer counts
        + answer(7, success=False, code="tool_error")
        + cancelled(7, may_have_run=False)
    )
    state = read_results(out)
    assert state.cancelled == {3: False, 4: True, 5: True, 7: False}
    plain = {n: state.settled(n) for n in range(1, 9)}
    assert plain == {1: True, 2: True, 3: False, 4: True, 5: True, 6: True, 7: False, 8: False}
    rerun = {n: state.settled(n, rerun_cancelled=True) for n in range(1, 9)}
    assert rerun == {1: True, 2: True, 3: False, 4: False, 5: False, 6: True, 7: False, 8: False}
    assert not ResultsState().settled(1)


# --------------------------------------------------------------------------- an interrupted run


class FakeQueue:
    """What the cancelling publisher passes on: ledger records and cancels."""

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        self.recorded: list[str] = []
        self.cancelled: set[str] = set()
        self.app = object()
        self.settings = object()
        self.on_cancel = on_cancel

    def record_in_ledger(self, entries: list[tuple[str, dict[str, Any]]], members: Any = ()) -> None:
        self.recorded.extend(task_id for task_id, _ in entries)

    def request_cancel(self, task_ids: Iterable[str]) -> None:
        self.cancelled.update(task_ids)
        if self.on_cancel is not None:
            self.on_cancel()

    def read_progress(self, task_ids: Iterable[str]) -> list[None]:
        return [None for _ in task_ids]


class InterruptingFanOut:
    """Sends ``window`` calls (recording each in the ledger, as the engine
    does), answers the first ``answer_first``, then presses Ctrl-C and answers
    the others ``cancelled`` once they were asked to cancel, or never
    (``silent``: it holds until ``release`` is set)."""

    def __init__(
        self, interrupt: Interrupt | None, *, window: int = 3, answer_first: int = 2, silent: bool = False
    ) -> None:
        self.interrupt = interrupt  # None: a real SIGINT to this process
        self.window = window
        self.answer_first = answer_first
        self.silent = silent
        self.release = threading.Event()
        self.asked_after_interrupt: Call | None = None

    def __call__(self, tq: Any, calls: Iterable[Call], **kw: Any) -> Iterator[tuple[int, ToolResult]]:
        feed = iter(calls)
        sent: list[tuple[int, Call, str]] = []
        for index in range(self.window):
            call = next(feed, None)
            if call is None:
                break
            tq.record_in_ledger([(f"t{index}", {})])
            sent.append((index, call, f"t{index}"))
        for index, call, task_id in sent[: self.answer_first]:
            yield index, ToolResult.ok(call.label, "s", {}, request_id=task_id)
        if self.interrupt is not None:
            self.interrupt.request()
        else:
            os.kill(os.getpid(), signal.SIGINT)  # the main thread's handler takes it
            wait_until(lambda: tq._tq.cancelled, 10, message="the SIGINT was never acted on")
        self.asked_after_interrupt = next(feed, None)  # nothing more is handed out after Ctrl-C
        if self.silent:
            self.release.wait(20)
            return
        rest = sent[self.answer_first :]
        wait_until(lambda: {t for _, _, t in rest} <= tq._tq.cancelled, 10, message="never cancelled")
        for index, call, task_id in rest:
            result = ToolResult(
                success=False,
                tool_name=call.label,
                error_code="cancelled",
                request_id=task_id,
                details={"may_have_run": call.arguments["n"] == 3},
            )
            yield index, result


def write_calls(path: Path) -> Path:
    # line 4 is malformed and line 6 blank: neither is a call that can be sent.
    lines = [call_line(1), call_line(2), call_line(3), "oops", call_line(5), "", call_line(7)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ctrl_c_cancels_what_is_outstanding_and_answers_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt = Interrupt()
    fake = InterruptingFanOut(interrupt)
    monkeypatch.setattr(fanout, "as_completed", fake)
    queue = FakeQueue()
    out = tmp_path / "out.jsonl"
    o = run_batch(write_calls(tmp_path / "calls.jsonl"), out, queue=queue, interrupt=interrupt)
    assert fake.asked_after_interrupt is None
    assert queue.recorded == ["t0", "t1", "t2"] and queue.cancelled == {"t2"}  # only the one outstanding
    got = rows(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 7]
    assert got[1]["success"] and got[2]["success"]
    assert got[3]["error_code"] == "cancelled" and got[3]["details"]["may_have_run"] is True
    assert got[4]["error_code"] == "invalid_arguments"
    for n in (5, 7):
        assert got[n]["error_code"] == "cancelled" and got[n]["attempts"] == 0
        assert got[n]["details"] == {"line": n, "may_have_run": False, "retry_safe": False, "sent": False}
    assert (o.interrupted, o.exit_code, o.cancelled, o.cancelled_may_have_run) == (True, 130, 3, 1)

    # The resume runs the lines that never ran (5 and 7), and keeps line 3.
    ran: list[int] = []

    def plain_fanout(tq: Any, calls: Iterable[Call], **kw: Any) -> Iterator[tuple[int, ToolResult]]:
        for index, call in enumerate(calls):
            ran.append(call.arguments["n"])
            yield index, ToolResult.ok(call.label, "s", {})

    monkeypatch.setattr(fanout, "as_completed", plain_fanout)
    again = run_batch(tmp_path / "calls.jsonl", out, queue=queue)
    assert ran == [5, 7]
    assert (again.cancelled_rerun, again.cancelled_kept, again.skipped, again.exit_code) == (2, 1, 4, 1)
    ran.clear()
    third = run_batch(tmp_path / "calls.jsonl", out, queue=queue, rerun_cancelled=True)
    assert ran == [3] and third.exit_code == 1  # line 4 (malformed) is still a failure


def test_calls_that_stay_silent_after_the_cancel_are_answered_as_may_have_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt = Interrupt()
    fake = InterruptingFanOut(interrupt, silent=True)
    monkeypatch.setattr(fanout, "as_completed", fake)
    out = tmp_path / "out.jsonl"
    try:
        started = time.monotonic()
        o = run_batch(
            write_calls(tmp_path / "calls.jsonl"),
            out,
            queue=FakeQueue(),
            interrupt=interrupt,
            cancel_wait=0.3,
        )
        assert time.monotonic() - started < 10
    finally:
        fake.release.set()
    got = rows(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 7]
    assert got[3]["error_code"] == "cancelled"
    assert got[3]["details"] == {"line": 3, "may_have_run": True, "retry_safe": False, "confirmed": False}
    assert "no result within 0.3s" in got[3]["error"]
    assert o.exit_code == 130 and o.cancelled_may_have_run == 1


def test_a_second_ctrl_c_stops_waiting_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt = Interrupt()
    fake = InterruptingFanOut(interrupt, silent=True)
    monkeypatch.setattr(fanout, "as_completed", fake)
    try:
        started = time.monotonic()
        run_batch(
            write_calls(tmp_path / "calls.jsonl"),
            tmp_path / "out.jsonl",
            queue=FakeQueue(on_cancel=interrupt.request),  # the second Ctrl-C comes as it waits
            interrupt=interrupt,
            cancel_wait=60,
        )
        assert time.monotonic() - started < 10
    finally:
        fake.release.set()
    assert rows(tmp_path / "out.jsonl")[3]["details"]["may_have_run"] is True


# --------------------------------------------------------------------------- the publisher


def test_the_cancelling_publisher_cancels_what_was_sent_and_not_answered() -> None:
    queue = FakeQueue()
    publisher = CancellingPublisher(queue)
    assert publisher.app is queue.app and publisher.settings is queue.settings
    publisher.record_in_ledger([("single", {})])
    # A chunk task: the entry is the chunk, the members are its calls.
    publisher.record_in_ledger([("chunk", {})], [("c1", "chunk"), ("c2", "chunk")])
    publisher.answered("c1")
    publisher.answered(None)  # a result made up without a task (never sent)
    publisher.stop()
    assert queue.cancelled == {"single", "c2"}
    # Sent after the cancel (it was being published): cancelled as it is recorded.
    publisher.record_in_ledger([("late", {})])
    assert queue.recorded[-1] == "late" and "late" in queue.cancelled


# --------------------------------------------------------------------------- SIGINT


def test_sigint_sets_the_interrupt_and_a_third_one_raises() -> None:
    before = signal.getsignal(signal.SIGINT)
    interrupt = Interrupt()
    with sigint_sets(interrupt):
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: interrupt.count == 1, 5)
        assert interrupt.requested
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: interrupt.count == 2, 5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: False, 5)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigint_sets_does_nothing_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def body() -> None:
        with sigint_sets(Interrupt()):
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert seen == [before]


# --------------------------------------------------------------------------- the command


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, ["batch", *args], env=CLEAN_ENV, prog_name="mcpq")


def test_cli_resume_reports_kept_and_rerun_cancelled_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[int] = []

    def plain_fanout(tq: Any, calls: Iterable[Call], **kw: Any) -> Iterator[tuple[int, ToolResult]]:
        for index, call in enumerate(calls):
            ran.append(call.arguments["n"])
            yield index, ToolResult.ok(call.label, "s", {})

    monkeypatch.setattr(fanout, "as_completed", plain_fanout)
    calls = tmp_path / "calls.jsonl"
    calls.write_text("".join(call_line(n) + "\n" for n in (1, 2, 3)))
    out = tmp_path / "out.jsonl"
    out.write_text(answer(1) + cancelled(2, may_have_run=False) + cancelled(3, may_have_run=True))

    first = run_cli(str(calls), "--out", str(out))
    assert first.exit_code == 1, first.output
    assert ran == [2]
    assert "ran again 1 lines answered cancelled before" in first.stdout
    assert "cancelled earlier and may have run: 1, not re-run; pass --rerun-cancelled to run them" in (
        first.stdout
    )
    summary = json.loads(run_cli(str(calls), "--out", str(out), "--json").stdout)
    assert (summary["calls"], summary["cancelled_kept"], summary["cancelled_rerun"]) == (0, 1, 0)

    ran.clear()
    rerun = run_cli(str(calls), "--out", str(out), "--rerun-cancelled")
    assert rerun.exit_code == 0, rerun.output
    assert ran == [3] and "may have run" not in rerun.stdout
    assert all(row["success"] for row in rows_last(out).values())


def rows_last(path: Path) -> dict[int, dict[str, Any]]:
    """Every line's last answer (a re-run line has more than one)."""
    return {row["line"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_cli_ctrl_c_says_what_was_cancelled_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = InterruptingFanOut(None)
    monkeypatch.setattr(fanout, "as_completed", fake)
    monkeypatch.setattr(batch_mod, "_queue", FakeQueue)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out.jsonl"
    result = run_cli(str(write_calls(tmp_path / "calls.jsonl")), "--out", str(out))
    assert result.exit_code == 130, result.output
    assert result.stdout.startswith("6 calls: 2 succeeded, 4 failed in ")
    assert "failures by error_code: cancelled 3, invalid_arguments 1" in result.stdout
    assert "mcpq: interrupted: 3 calls cancelled (1 may have run: a resume keeps those" in result.stderr
    assert sorted(rows(out)) == [1, 2, 3, 4, 5, 7]
    assert signal.getsignal(signal.SIGINT) is before  # the command's handler is gone again


def test_cli_cancel_wait_must_be_seconds(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    calls.write_text(call_line(1) + "\n")
    result = run_cli(str(calls), "--out", str(tmp_path / "o"), "--cancel-wait", "-1")
    assert result.exit_code == 2 and "number of seconds" in result.output
