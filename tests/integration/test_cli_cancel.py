"""Cancel and progress from the command line, against a real worker: ``mcpq
cancel``, ``mcpq call --progress``, Ctrl-C during ``mcpq call`` and during
``mcpq batch`` (and the resume after it).

The test server's own records say what really ran: ``count``/``read_count``
for how often a line's call ran, ``wait_for_cancel``/``read_events`` for a
call held until it is cancelled. Ctrl-C is a real SIGINT sent to the CLI
process once the output shows the point the test wants.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import read_count, read_events, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000
CLI = [sys.executable, "-m", "mcpq.producer.cli"]


def mcpq(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=stack.env, capture_output=True, text=True, timeout=90)


def start(stack: Stack, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args], env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"the CLI did not exit after SIGINT\n{out}\n{err}") from None
    return proc.returncode, out, err


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Stack:
    s: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0, timeout=90)})
    s.start_worker(concurrency=1)  # one slot: what is queued waits behind what runs
    return s


def hold(stack: Stack, count_dir: Path, key: str) -> str:
    """Submit a wait_for_cancel call and wait until the server runs it; its id."""
    handle = stack.queue.submit("wait_for_cancel", {"key": key, "ms": HOLD_MS}, timeout=90)
    wait_until(lambda: read_events(count_dir, key) == ["started"], 60, message="the call never started")
    return handle.id


# --------------------------------------------------------------------------- mcpq cancel


def test_cancel_a_finished_call_changes_nothing_and_says_how_it_ended(stack: Stack) -> None:
    handle = stack.queue.submit("add", {"a": 1, "b": 2})
    assert handle.result(60).success
    done = mcpq(stack, "cancel", handle.id)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{handle.id} finished ok\n"

    failed = stack.queue.submit("fail", {"message": "boom"})
    assert failed.result(60).error_code == "tool_error"
    rows = mcpq(stack, "cancel", "--json", handle.id, failed.id)
    assert rows.returncode == 0, rows.stderr
    listed = json.loads(rows.stdout)
    assert [(r["task_id"], r["state"]) for r in listed] == [(handle.id, "finished"), (failed.id, "finished")]
    assert listed[0]["result"]["success"] is True
    assert listed[1]["result"]["error_code"] == "tool_error"
    assert mcpq(stack, "cancel", failed.id).stdout == f"{failed.id} finished tool_error\n"


def test_cancel_a_running_call_and_wait_for_its_end(stack: Stack, count_dir: Path) -> None:
    call_id = hold(stack, count_dir, "held")
    done = mcpq(stack, "cancel", call_id, "--wait", "30")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{call_id} cancel requested",
        f"{call_id} ended cancelled (it may have run)",
    ]
    wait_until(lambda: read_events(count_dir, "held") == ["started", "cancelled"], 20)
    result = stack.queue.get(call_id).result(10)
    assert result.error_code == "cancelled" and result.details["may_have_run"] is True


def test_cancel_a_queued_call_in_json_with_wait(stack: Stack, count_dir: Path) -> None:
    running = hold(stack, count_dir, "front")
    queued = stack.queue.submit("count", {"key": "behind"})  # waits for the one slot
    done = mcpq(stack, "cancel", "--json", "--wait", "30", queued.id, running)
    assert done.returncode == 0, done.stderr
    rows = {r["task_id"]: r for r in json.loads(done.stdout)}
    assert rows[queued.id]["state"] == rows[running]["state"] == "requested"
    assert rows[queued.id]["result"]["error_code"] == "cancelled"
    assert rows[queued.id]["result"]["details"]["may_have_run"] is False
    assert rows[running]["result"]["details"]["may_have_run"] is True
    assert read_count(count_dir, "behind") == 0


def test_cancel_malformed_and_unknown_ids(stack: Stack) -> None:
    malformed = mcpq(stack, "cancel", "not an id!")
    assert malformed.returncode == 2
    assert "mcpq: invalid_arguments: 'not an id!' is not a call id" in malformed.stderr
    assert "Traceback" not in malformed.stderr

    unknown_id = str(uuid.uuid4())
    unknown = mcpq(stack, "cancel", unknown_id)
    assert unknown.returncode == 1
    assert f"mcpq: call_not_found: no call {unknown_id!r} is known" in unknown.stderr

    handle = stack.queue.submit("add", {"a": 1, "b": 1})
    assert handle.result(60).success
    # Every id is processed; the worst code wins (2 over 1).
    mixed = mcpq(stack, "cancel", unknown_id, handle.id, "bad id")
    assert mixed.returncode == 2
    assert mixed.stdout == f"{handle.id} finished ok\n"
    assert "no call" in mixed.stderr and "'bad id' is not a call id" in mixed.stderr
    as_json = mcpq(stack, "cancel", "--json", unknown_id, handle.id)
    assert as_json.returncode == 1
    rows = json.loads(as_json.stdout)
    assert rows[0]["state"] == "error" and rows[0]["error_code"] == "call_not_found"
    assert rows[1]["state"] == "finished"


# --------------------------------------------------------------------------- mcpq call


def test_call_progress_without_a_terminal_prints_one_line_per_update(stack: Stack, count_dir: Path) -> None:
    done = mcpq(stack, "call", "progress", "key=p", "steps=4", "ms=150", "--progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["structuredContent"] == {"result": 4}
    lines = [line for line in done.stderr.splitlines() if line.startswith("mcpq: progress ")]
    assert lines, done.stderr
    assert lines[-1] == "mcpq: progress 4/4 (100%) step 4 of 4"  # the last update is always shown
    assert len(lines) == len(set(lines)) <= 4  # never one update twice
    assert "\x1b[" not in done.stderr  # no bar, no escape codes off a terminal
    assert read_count(count_dir, "p") == 1


def test_ctrl_c_during_call_cancels_the_call(stack: Stack, count_dir: Path) -> None:
    proc = start(stack, "call", "wait_for_cancel", "key=cc", f"ms={HOLD_MS}", "--timeout", "90")
    wait_until(lambda: read_events(count_dir, "cc") == ["started"], 60, message="the call never started")
    code, out, err = interrupt(proc)
    assert code == 130, (out, err)
    assert "cancelled (it may have run)" in err and "Traceback" not in err
    result = json.loads(out)
    assert result["error_code"] == "cancelled" and result["details"]["may_have_run"] is True
    wait_until(lambda: read_events(count_dir, "cc") == ["started", "cancelled"], 20)


# --------------------------------------------------------------------------- mcpq batch


def result_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("chunk_size", "window", "first_done"),
    [("1", "3", {1, 2}), ("2", "2", {1, 2, 4})],
    ids=["one-task-per-call", "chunks"],
)
def test_ctrl_c_during_batch_cancels_the_rest_and_resume_runs_what_never_ran(
    stack: Stack, count_dir: Path, tmp_path: Path, chunk_size: str, window: str, first_done: set[int]
) -> None:
    keys = {1: "a1", 2: "a2", 4: "b4", 5: "b5", 6: "b6", 7: "b7"}
    calls = tmp_path / "calls.jsonl"
    lines = [
        json.dumps({"tool": "count", "arguments": {"key": keys[n]}})
        if n != 3
        else json.dumps(
            {"tool": "wait_for_cancel", "arguments": {"key": "hold", "ms": HOLD_MS}, "timeout": 90}
        )
        for n in range(1, 8)
    ]
    calls.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    args = ["batch", str(calls), "--out", str(out), "--chunk-size", chunk_size, "--window", window]

    proc = start(stack, *args, "--cancel-wait", "30", "--json")
    wait_until(
        lambda: {r["line"] for r in result_rows(out)} >= first_done and read_events(count_dir, "hold"),
        60,
        message=lambda: f"the batch never got that far: {result_rows(out)}",
    )
    code, stdout, stderr = interrupt(proc)
    assert code == 130, (stdout, stderr)
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert "interrupted" in stderr and "Traceback" not in stderr

    rows = result_rows(out)
    assert sorted(r["line"] for r in rows) == list(range(1, 8))  # every line answered exactly once
    by_line = {r["line"]: r for r in rows}
    for n in first_done:
        assert by_line[n]["success"] is True
    held = by_line[3]
    assert held["error_code"] == "cancelled" and held["details"]["may_have_run"] is True
    rest = set(range(4, 8)) - first_done
    for n in rest:
        assert by_line[n]["error_code"] == "cancelled", by_line[n]
        assert by_line[n]["details"]["may_have_run"] is False, by_line[n]
        assert read_count(count_dir, keys[n]) == 0
    wait_until(lambda: read_events(count_dir, "hold") == ["started", "cancelled"], 20)
    assert summary["cancelled"] == 1 + len(rest) and summary["cancelled_may_have_run"] == 1

    resumed = mcpq(stack, *args)
    assert resumed.returncode == 1, resumed.stderr  # line 3 stays answered cancelled
    assert f"ran again {len(rest)} lines answered cancelled before" in resumed.stdout
    assert "may have run: 1, not re-run; pass --rerun-cancelled to run them" in resumed.stdout
    # Each line's call ran exactly once over both runs; the held call was not run again.
    assert {key: read_count(count_dir, key) for key in keys.values()} == dict.fromkeys(keys.values(), 1)
    assert read_events(count_dir, "hold") == ["started", "cancelled"]
    last = {r["line"]: r for r in result_rows(out)}  # the last answer for a line counts
    assert [n for n in range(1, 8) if last[n]["success"]] == [1, 2, 4, 5, 6, 7]

    again = mcpq(stack, *args, "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout)["calls"] == 0  # nothing left to run without --rerun-cancelled
