"""mcpq.producer.batch without a broker: line parsing, the results file and resume,
progress and summary, exit codes; the fan-out itself is faked."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from mcpq.producer import batch as batch_mod
from mcpq.producer import fanout
from mcpq.producer.batch import (
    BatchOutcome,
    ProgressBar,
    ResultsFileError,
    parse_line,
    read_results,
    repair_results,
    result_line,
    run_batch,
)
from mcpq.producer.calls import Call
from mcpq.producer.cli import cli
from mcpq.worker.contract.result import ToolResult

pytestmark = pytest.mark.timeout(30)

CLEAN_ENV: dict[str, str | None] = {
    "MCPQ_CONFIG": None,
    "MCPQ_REDIS_URL": None,
    "MCPQ_BROKER_URL": None,
    "MCPQ_RESULT_BACKEND": None,
    "MCPQ_KEY_PREFIX": None,
}


def test_batch_is_a_click_command_named_batch() -> None:
    assert isinstance(batch_mod.batch, click.Command)
    assert batch_mod.batch.name == "batch"
    assert cli.get_command(click.Context(cli), "batch") is batch_mod.batch


# --------------------------------------------------------------------------- parse_line


def test_parse_good_line_with_defaults() -> None:
    call = parse_line(3, b'{"tool": "add", "arguments": {"a": 1}}\n', default_server="s", default_timeout=5)
    assert call == Call("add", {"a": 1}, "s", 5.0)
    assert parse_line(1, '{"tool": "x/y"}') == Call("x/y", {})


@pytest.mark.parametrize(
    ("raw", "tool", "fragment"),
    [
        (b"not json", "?", "not valid JSON"),
        (b'{"tool": "add",', "?", "not valid JSON"),
        (b"[1, 2]", "?", "a call must be a JSON object, got array"),
        (b'"add"', "?", "got string"),
        (b'{"arguments": {}}', "?", "missing 'tool'"),
        (b'{"tool": "add", "arguments": [1]}', "add", "'arguments' of 'add' must be a JSON object"),
        (b'{"tool": "add", "arguments": 3}', "add", "got number"),
        (b'{"tool": "add", "argument": {}}', "add", "unknown field(s) 'argument'"),
        (b'{"tool": "add", "timeout": -1}', "add", "positive number"),
        (b'{"tool": "\xff"}', "?", "not valid UTF-8"),
    ],
)
def test_parse_bad_lines_become_invalid_arguments_results(raw: bytes, tool: str, fragment: str) -> None:
    result = parse_line(7, raw)
    assert isinstance(result, ToolResult)
    assert result.success is False
    assert result.error_code == "invalid_arguments"
    assert result.tool_name == tool
    assert result.error is not None and result.error.startswith("line 7: ")
    assert fragment in result.error
    assert result.details == {"line": 7}


# --------------------------------------------------------------------------- the results file


def ok_line(n: int, success: bool = True) -> str:
    return result_line(n, ToolResult(success=success, tool_name="t"))


def test_result_line_round_trip() -> None:
    line = result_line(4, ToolResult.ok("add", "s", {"structuredContent": {"result": 3}}))
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert parsed["line"] == 4 and parsed["success"] is True and parsed["server_name"] == "s"
    assert ToolResult.from_dict(parsed).structured == {"result": 3}


def test_read_results_missing_and_empty(tmp_path: Path) -> None:
    assert read_results(tmp_path / "nope.jsonl").answered == {}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    state = read_results(empty)
    assert state.answered == {} and state.torn_bytes == 0


def test_read_results_drops_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = ok_line(2) + ok_line(1, success=False) + "\n" + ok_line(5)
    out.write_text(good + '{"line": 3, "succ')
    state = read_results(out)
    assert state.answered == {2: True, 1: False, 5: True}
    assert state.good_bytes == len(good.encode())
    assert state.torn_bytes == len(b'{"line": 3, "succ')
    repair_results(out, state)
    assert out.read_text() == good


def test_read_results_torn_line_followed_by_blank_lines(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(1) + "{garbage\n\n")
    state = read_results(out)
    assert state.answered == {1: True} and state.torn_bytes == len("{garbage\n\n")
    repair_results(out, state)
    assert out.read_text() == ok_line(1)


def test_read_results_complete_last_line_without_newline(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(1) + ok_line(2).rstrip("\n"))
    state = read_results(out)
    assert state.answered == {1: True, 2: True}
    assert state.needs_newline and state.torn_bytes == 0
    repair_results(out, state)
    assert out.read_text() == ok_line(1) + ok_line(2)


def test_read_results_later_answer_wins(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(1, success=False) + ok_line(1))
    assert read_results(out).answered == {1: True}


@pytest.mark.parametrize(
    "bad",
    ["not json", '{"line": 0, "success": true}', '{"line": "3", "success": true}', '{"line": 3}', "[]"],
)
def test_read_results_refuses_a_bad_middle_line(tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(1) + bad + "\n" + ok_line(2))
    with pytest.raises(ResultsFileError, match="line 2 is not a result line"):
        read_results(out)


# --------------------------------------------------------------------------- progress and summary


def test_progress_bar_render_and_tty_only() -> None:
    bar = ProgressBar(200, io.StringIO(), enabled=True, width=10)
    text = bar.render(50, 2, now=bar.started + 10.0)
    assert "[##........] 50/200" in text and "25%" in text
    assert "5.0 calls/s" in text and "ETA 0:30" in text and "2 failed" in text
    done = bar.render(200, 0, now=bar.started + 40.0)
    assert "in 0:40" in done and "failed" not in done
    silent = io.StringIO()
    off = ProgressBar(10, silent, enabled=False)
    off.update(5, 0, force=True)
    off.close(10, 0)
    assert silent.getvalue() == ""
    drawn = io.StringIO()
    on = ProgressBar(10, drawn, enabled=True)
    on.update(5, 0, force=True)
    on.close(10, 0)
    assert drawn.getvalue().startswith("\r[") and drawn.getvalue().endswith("\n")


def test_outcome_summary_and_exit_codes() -> None:
    o = BatchOutcome(calls=10, succeeded=8, failed=2, seconds=4.0)
    assert o.summary() == "10 calls: 8 succeeded, 2 failed in 4.0s (2.5 calls/s)"
    assert o.exit_code == 1
    assert BatchOutcome(calls=3, succeeded=3, seconds=1).exit_code == 0
    assert BatchOutcome(previously_failed=1).exit_code == 1
    assert BatchOutcome(calls=1, succeeded=1, unanswered=2).exit_code == 3
    assert BatchOutcome(problem="broker down").exit_code == 3
    assert BatchOutcome().summary() == "0 calls: 0 succeeded, 0 failed in 0.0s (0.0 calls/s)"


# --------------------------------------------------------------------------- run_batch with a fake fan-out


class FakeFanOut:
    """Answers every call at once, in reverse order of each window; calls whose
    arguments say so fail, stall, or take the broker down."""

    def __init__(self) -> None:
        self.ran: list[dict[str, Any]] = []

    def __call__(self, tq: Any, calls: Iterable[Call], **kw: Any) -> Iterator[tuple[int, ToolResult]]:
        buffered: list[tuple[int, Call]] = []
        for index, call in enumerate(calls):
            buffered.append((index, call))
            if len(buffered) == 3:
                yield from self._answer(buffered)
                buffered = []
        yield from self._answer(buffered)

    def _answer(self, items: list[tuple[int, Call]]) -> Iterator[tuple[int, ToolResult]]:
        for index, call in reversed(items):
            if call.arguments.get("down"):
                from mcpq.worker.contract.errors import MCPConnectionError

                raise MCPConnectionError("cannot reach the broker at redis://x")
            self.ran.append(call.arguments)
            if call.arguments.get("stall"):
                yield (
                    index,
                    ToolResult(
                        success=False, tool_name=call.tool, error_code="timeout", details={"stalled": True}
                    ),
                )
            elif call.arguments.get("fail"):
                yield index, ToolResult(success=False, tool_name=call.tool, error_code="tool_error")
            else:
                yield index, ToolResult.ok(call.label, "s", {"structuredContent": call.arguments})


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFanOut:
    f = FakeFanOut()
    monkeypatch.setattr(fanout, "as_completed", f)
    return f


def write_calls(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def call_line(n: int, **extra: Any) -> str:
    return json.dumps({"tool": "t", "arguments": {"n": n, **extra}})


def rows(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert row["line"] not in out, f"line {row['line']} answered twice"
        out[row["line"]] = row
    return out


def test_run_batch_maps_results_to_lines(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(
        tmp_path / "calls.jsonl",
        [call_line(1), "oops", call_line(3), "", call_line(5, fail=True), '{"tool": "t", "arguments": []}'],
    )
    out = tmp_path / "out.jsonl"
    o = run_batch(calls, out, queue=object(), server="srv")
    got = rows(out)
    assert sorted(got) == [1, 2, 3, 5, 6]
    assert got[1]["data"]["structuredContent"] == {"n": 1} and got[1]["tool_name"] == "srv/t"
    assert got[3]["data"]["structuredContent"] == {"n": 3}
    assert got[2]["error_code"] == "invalid_arguments" and got[2]["error"].startswith("line 2:")
    assert got[6]["error_code"] == "invalid_arguments" and got[6]["tool_name"] == "t"
    assert got[5]["error_code"] == "tool_error"
    assert (o.calls, o.succeeded, o.failed, o.skipped) == (5, 2, 3, 0)
    assert o.error_codes == {"invalid_arguments": 2, "tool_error": 1}
    assert o.exit_code == 1


def test_run_batch_resumes_only_missing_lines(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(n) for n in range(1, 11)])
    out = tmp_path / "out.jsonl"
    run_batch(calls, out, queue=object())
    assert len(fake.ran) == 10
    kept = out.read_text().splitlines(keepends=True)[:6]
    answered = {json.loads(line)["line"] for line in kept}
    out.write_text("".join(kept) + '{"line": 9, "success": tr')
    fake.ran.clear()
    o = run_batch(calls, out, queue=object())
    assert sorted(a["n"] for a in fake.ran) == sorted(set(range(1, 11)) - answered)
    assert sorted(rows(out)) == list(range(1, 11))
    assert (o.calls, o.skipped, o.torn_bytes > 0, o.exit_code) == (4, 6, True, 0)
    # Nothing left: no call runs and the queue is never even created.
    fake.ran.clear()

    def no_queue() -> Any:
        raise AssertionError("no broker needed")

    o = run_batch(calls, out, queue=no_queue)
    assert fake.ran == [] and o.calls == 0 and o.skipped == 10 and o.exit_code == 0


def test_run_batch_only_invalid_lines_needs_no_broker(tmp_path: Path) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", ["nope", "[]"])
    out = tmp_path / "out.jsonl"

    def no_queue() -> Any:
        raise AssertionError("no broker needed")

    o = run_batch(calls, out, queue=no_queue)
    assert sorted(rows(out)) == [1, 2] and o.failed == 2 and o.exit_code == 1


def test_run_batch_previous_failures_keep_exit_code_1(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), call_line(2)])
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(1, success=False))
    o = run_batch(calls, out, queue=object())
    assert (o.calls, o.failed, o.previously_failed, o.exit_code) == (1, 0, 1, 1)


def test_run_batch_stalled_calls_stay_unanswered(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), call_line(2, stall=True)])
    out = tmp_path / "out.jsonl"
    o = run_batch(calls, out, queue=object())
    assert sorted(rows(out)) == [1]
    assert (o.unanswered, o.exit_code) == (1, 3)


def test_run_batch_broker_lost_midway(tmp_path: Path, fake: FakeFanOut) -> None:
    lines = [call_line(1), call_line(2), call_line(3), call_line(4), call_line(5, down=True), "bad"]
    calls = write_calls(tmp_path / "calls.jsonl", lines)
    out = tmp_path / "out.jsonl"
    o = run_batch(calls, out, queue=object())
    assert o.problem is not None and "broker" in o.problem and o.exit_code == 3
    # the first window was answered and written; the malformed line read so far too
    assert set(rows(out)) >= {1, 2, 3}


def test_run_batch_refuses_results_of_another_file(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), "", call_line(3)])
    out = tmp_path / "out.jsonl"
    out.write_text(ok_line(2))  # line 2 is blank in calls.jsonl
    with pytest.raises(ResultsFileError, match="answers line 2"):
        run_batch(calls, out, queue=object())


# --------------------------------------------------------------------------- the command


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, ["batch", *args], env=CLEAN_ENV | (env or {}), prog_name="mcpq")


def test_cli_missing_calls_file_is_usage_error(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_cli_requires_out(tmp_path: Path) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1)])
    assert run_cli(str(calls)).exit_code == 2
    assert run_cli(str(calls), "--out", str(calls)).exit_code == 2
    assert run_cli(str(calls), "--out", str(tmp_path / "o"), "--window", "-1").exit_code == 2


def test_cli_chunk_size_out_of_range_is_usage_error(tmp_path: Path) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1)])
    result = run_cli(str(calls), "--out", str(tmp_path / "o"), "--chunk-size", "1001")
    assert result.exit_code == 2
    assert "--chunk-size" in result.stderr and "1<=x<=1000" in result.stderr
    assert "Traceback" not in result.output


def test_cli_bad_results_file_is_usage_error(tmp_path: Path) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), call_line(2)])
    out = tmp_path / "out.jsonl"
    out.write_text("garbage\n" + ok_line(1))
    result = run_cli(str(calls), "--out", str(out))
    assert result.exit_code == 2
    assert "is not a result line" in result.stderr


def test_cli_summary_and_json(tmp_path: Path, fake: FakeFanOut) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), call_line(2, fail=True), "x"])
    out = tmp_path / "out.jsonl"
    result = run_cli(str(calls), "--out", str(out))
    assert result.exit_code == 1, result.output
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("3 calls: 1 succeeded, 2 failed in ") and first.endswith(" calls/s)")
    assert second == "failures by error_code: tool_error 1, invalid_arguments 1" or second == (
        "failures by error_code: invalid_arguments 1, tool_error 1"
    )
    again = run_cli(str(calls), "--out", str(out), "--json")
    assert again.exit_code == 1
    summary = json.loads(again.stdout)
    assert summary["calls"] == 0 and summary["skipped"] == 3 and summary["previously_failed"] == 2


def test_cli_broker_unreachable_exits_3(tmp_path: Path) -> None:
    calls = write_calls(tmp_path / "calls.jsonl", [call_line(1), "bad"])
    out = tmp_path / "out.jsonl"
    dead = "redis://127.0.0.1:1"
    env: dict[str, str | None] = {"MCPQ_BROKER_URL": f"{dead}/0", "MCPQ_RESULT_BACKEND": f"{dead}/1"}
    result = run_cli(str(calls), "--out", str(out), env=env)
    assert result.exit_code == 3, result.output
    assert "cannot reach" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(rows(out)) == [2]  # the malformed line is answered; line 1 is left for a re-run


# --------------------------------------------------------------------------- hostile lines


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"tool": "add", "arguments": {"n": ' + "9" * 5000 + "}}", "digits"),
        ('{"tool": "add", "arguments": {"deep": ' + "[" * 3000 + "]" * 3000 + "}}", "nested too deeply"),
        ('{"tool": "add", "arguments": {"n": NaN}}', "NaN"),
        ('{"tool": "add", "arguments": {"n": -Infinity}}', "Infinity"),
        ('{"tool": "add", "arguments": {"n": 1e400}}', "not a JSON number"),
        ('{"tool": "add", "timeout": 1e400}', "finite"),
        ('{"tool": "add", "arguments": {"text": "\\ud800"}}', "lone surrogate"),
    ],
    ids=["huge-int", "deep", "nan", "infinity", "overflow-arg", "overflow-timeout", "surrogate"],
)
def test_every_bad_line_is_its_own_invalid_arguments_result(line: str, says: str) -> None:
    result = parse_line(7, line.encode())
    assert isinstance(result, ToolResult)
    assert result.error_code == "invalid_arguments"
    assert result.error is not None and result.error.startswith("line 7: ") and says in result.error
