"""Fan-out end to end: chunked groups through a real worker, results per call,
and `mcpq batch` as users run it (a subprocess), including resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpq.producer.calls import Call, Progress
from mcpq.producer.collector import PendingCall, ResultCollector
from mcpq.producer.fanout import FanOutHandle
from mcpq.producer.queue import ToolQueue
from tests.support.procs import REPO_ROOT, read_count
from tests.support.stack import stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_map_300_adds_in_order_with_progress(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    seen: list[Progress] = []
    # A window smaller than the batch: chunks are published as earlier ones finish.
    results = stack.queue.map(
        "add",
        [{"a": i, "b": 1000} for i in range(300)],
        timeout=30,
        on_progress=seen.append,
        chunk_size=40,
        window=100,
    )
    assert len(results) == 300
    for i, result in enumerate(results):
        assert result.success, result
        assert result.structured == {"result": i + 1000}
        assert result.server_name == "local"
    assert [p.done for p in seen] == list(range(1, 301))
    assert seen[-1].total == 300 and seen[-1].failed == 0 and seen[-1].succeeded == 300
    assert seen[-1].submitted == 300 and seen[-1].in_flight == 0
    # The window held: never more than 100 calls outstanding.
    assert max(p.in_flight for p in seen) <= 100


def test_fan_out_mixes_tools_servers_and_failures(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir), "other": stdio_server(count_dir)})
    stack.start_worker()
    calls: list[Call | dict[str, Any]] = [
        Call("add", {"a": 1, "b": 2}, server="local"),  # 0 ok
        {"tool": "other/add", "arguments": {"a": 3, "b": 4}},  # 1 ok, qualified name
        Call("add", {"a": "x", "b": 1}, server="local"),  # 2 fails the inputSchema
        Call("no_such_tool", {}, server="local"),  # 3 unknown tool
        Call("fail", {"message": "boom"}, server="other"),  # 4 the tool reports an error
        {"tool": "add", "arguments": [1, 2]},  # 5 malformed: never published
        {"arguments": {"a": 1}},  # 6 malformed: no tool
        Call("add", {"a": 1, "b": 1}, server="ghost"),  # 7 no such server
        Call("math.mul", {"a": 6, "b": 7}, server="other", timeout=20),  # 8 ok
        Call("add", {"a": 1, "b": 1}),  # 9 ambiguous: both servers offer add
    ]
    seen: list[Progress] = []
    results = stack.queue.fan_out(calls, on_progress=seen.append)
    assert len(results) == len(calls)
    codes = [r.error_code for r in results]
    assert codes == [
        None,
        None,
        "invalid_arguments",
        "tool_not_found",
        "tool_error",
        "invalid_arguments",
        "invalid_arguments",
        "server_not_found",
        None,
        "ambiguous_tool",
    ], [(r.error_code, r.error) for r in results]
    assert results[0].structured == {"result": 3}
    assert results[1].structured == {"result": 7} and results[1].server_name == "other"
    assert results[8].structured == {"result": 42}
    assert "boom" in results[4].text
    assert "call 5" in (results[5].error or "") and "JSON object" in (results[5].error or "")
    assert "missing 'tool'" in (results[6].error or "")
    final = seen[-1]
    assert (final.done, final.failed, final.total) == (10, 7, 10)
    assert final.succeeded == 3


def test_as_completed_yields_every_index_once_in_completion_order(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker(concurrency=8)
    # Call 0 is slow, the rest are quick: 0 must not come first. A generator
    # input (unknown length) and a small window exercise lazy reading.
    calls = (Call("sleep_ms", {"ms": 400 if i == 0 else i % 3}, timeout=30) for i in range(120))
    seen: list[Progress] = []
    order = []
    for index, result in stack.queue.as_completed(calls, on_progress=seen.append, chunk_size=10, window=30):
        assert result.success, result
        order.append(index)
    assert sorted(order) == list(range(120))
    assert order[0] != 0
    assert order.index(0) > 0
    assert seen[-1].total == 120 and seen[-1].done == 120


def test_submit_many_handle_and_attach(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    calls = [Call("add", {"a": i, "b": i}, timeout=30) for i in range(50)]
    handle: FanOutHandle = stack.queue.submit_many(calls, chunk_size=16)
    assert len(handle.ids) == 50 and len(set(handle.ids)) == 50
    assert len(handle.chunk_ids) == 4  # 16 + 16 + 16 + 2 calls, every chunk task published already
    # Another ToolQueue (as another process would) follows the same calls by
    # id, looking now and then without waiting (as an HTTP status endpoint would).
    other = ToolQueue(stack.settings)
    polled: dict[int, Any] = {}
    try:
        with FanOutHandle.attach(other, handle.ids, handle.labels) as attached:
            deadline = time.monotonic() + 60
            while not attached.done() and time.monotonic() < deadline:
                for index, result in attached.poll():
                    assert index not in polled
                    polled[index] = result
                time.sleep(0.05)
            assert attached.done() and attached.progress.done == 50
    finally:
        other.close()
    results = handle.results(timeout=60)
    assert [r.structured for r in results] == [{"result": 2 * i} for i in range(50)]
    assert [polled[i].to_dict() for i in range(50)] == [r.to_dict() for r in results]
    assert handle.done() and list(handle.iter_completed()) == []
    assert handle.progress.done == 50


def test_calls_nobody_consumes_end_as_timeouts_after_a_stall(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    results = stack.queue.fan_out(
        [Call("add", {"a": 1, "b": 2}), Call("add", {"a": 2, "b": 2})],
        queue=f"{stack.settings.queue}-nobody",
        stall_timeout=1.5,
    )
    for result in results:
        assert result.error_code == "timeout", result
        assert "still queued" in (result.error or "")
        assert result.details["stalled"] is True


def test_lost_pushes_and_no_push_backends_fall_back_to_sweeps(
    make_stack: Callable[..., Any], count_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    original_add = ResultCollector.add

    def lose_every_third(self: ResultCollector, slot: PendingCall) -> None:
        if slot.index % 3 == 0:  # as if its result message never arrived
            self._pending[str(slot.result.id)] = slot
        else:
            original_add(self, slot)

    monkeypatch.setattr(ResultCollector, "add", lose_every_third)
    results = stack.queue.map("add", [{"a": i, "b": 1} for i in range(30)], timeout=30)
    assert [r.structured for r in results] == [{"result": i + 1} for i in range(30)]
    monkeypatch.setattr(ResultCollector, "add", original_add)

    original_init = ResultCollector.__init__

    def no_push(self: ResultCollector, app: Any) -> None:
        original_init(self, app)
        self._consumer = None  # a backend without pub/sub: MGET polling only

    monkeypatch.setattr(ResultCollector, "__init__", no_push)
    results = stack.queue.map("add", [{"a": i, "b": 2} for i in range(60)], timeout=30, chunk_size=25)
    assert [r.structured for r in results] == [{"result": i + 2} for i in range(60)]


# --------------------------------------------------------------------------- mcpq batch


def run_batch(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", "batch", *args],
        env=stack.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_batch_cli_writes_every_line_and_resumes(
    make_stack: Callable[..., Any], count_dir: Path, tmp_path: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    lines: list[str] = [json.dumps({"tool": "count", "arguments": {"key": f"k{n}"}}) for n in range(1, 21)]
    lines.insert(5, "this is not json")  # line 6
    lines.insert(9, json.dumps({"tool": "count", "arguments": "k9"}))  # line 10: arguments not an object
    lines.insert(12, json.dumps({"tool": "fail", "arguments": {"message": "boom"}}))  # line 13
    lines.insert(14, "")  # line 15: blank, not a call
    lines.insert(16, json.dumps(["count"]))  # line 17: not an object
    calls_file = tmp_path / "calls.jsonl"
    calls_file.write_text("\n".join(lines) + "\n")
    call_lines = {n for n, text in enumerate(lines, start=1) if text.strip()}
    key_of_line = {
        n: json.loads(text)["arguments"]["key"]
        for n, text in enumerate(lines, start=1)
        if text.startswith('{"tool": "count", "arguments": {')
    }
    assert len(key_of_line) == 20
    out = tmp_path / "results.jsonl"

    first = run_batch(stack, str(calls_file), "--out", str(out), "--window", "8", "--chunk-size", "4")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    assert first.stdout.startswith("24 calls: 20 succeeded, 4 failed in "), first.stdout
    assert "calls/s)" in first.stdout.splitlines()[0]
    rows = read_out(out)
    assert sorted(r["line"] for r in rows) == sorted(call_lines)
    by_line = {r["line"]: r for r in rows}
    for n in (6, 10, 17):
        assert by_line[n]["error_code"] == "invalid_arguments"
        assert f"line {n}:" in by_line[n]["error"]
    assert by_line[13]["error_code"] == "tool_error"
    for n, key in key_of_line.items():
        assert by_line[n]["success"] is True, by_line[n]
        assert by_line[n]["data"]["structuredContent"] == {"result": 1}
        assert read_count(count_dir, key) == 1

    # A crash mid-way: the last answers are lost and a line is torn.
    text_lines = out.read_text().splitlines(keepends=True)
    kept, lost = text_lines[:-5], text_lines[-5:]
    lost_lines = {json.loads(line)["line"] for line in lost}
    out.write_text("".join(kept) + '{"line": 3, "success": tr')

    second = run_batch(stack, str(calls_file), "--out", str(out), "--json")
    assert second.returncode == 1, second.stdout + second.stderr
    summary = json.loads(second.stdout)
    assert summary["calls"] == len(lost_lines)
    assert summary["skipped"] == len(call_lines) - len(lost_lines)
    assert summary["torn_bytes_dropped"] > 0
    rows = read_out(out)
    assert sorted(r["line"] for r in rows) == sorted(call_lines)  # each line exactly once
    for n, key in key_of_line.items():
        assert read_count(count_dir, key) == (2 if n in lost_lines else 1), (n, lost_lines)

    # Everything answered: a third run publishes nothing and runs nothing.
    third = run_batch(stack, str(calls_file), "--out", str(out))
    assert third.returncode == 1  # line 13 still failed
    assert third.stdout.startswith("0 calls: 0 succeeded, 0 failed")
    assert sum(read_count(count_dir, key) for key in key_of_line.values()) == 20 + len(
        lost_lines & set(key_of_line)
    )


def test_batch_cli_all_good_exits_0(make_stack: Callable[..., Any], count_dir: Path, tmp_path: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    calls_file = tmp_path / "calls.jsonl"
    calls_file.write_text(
        "".join(json.dumps({"tool": "add", "arguments": {"a": i, "b": 1}}) + "\n" for i in range(30))
    )
    out = tmp_path / "out.jsonl"
    done = run_batch(stack, str(calls_file), "--out", str(out), "--timeout", "20", "--server", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("30 calls: 30 succeeded, 0 failed in ")
    assert "[" not in done.stderr  # no progress bar when stderr is not a terminal
    rows = sorted(read_out(out), key=lambda r: r["line"])
    assert [r["data"]["structuredContent"]["result"] for r in rows] == [i + 1 for i in range(30)]
    assert all(r["server_name"] == "local" for r in rows)
