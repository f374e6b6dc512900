"""The working core, end to end: producer -> Redis broker -> real Celery worker
process -> pooled MCP sessions -> real MCP servers over stdio, Streamable
HTTP and legacy SSE."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import (
    ServerProcess,
    descendants,
    everything_stdio_command,
    pid_alive,
    read_concurrency,
    read_count,
    start_everything_server,
    start_hang_server,
    start_test_server,
    stdio_command_for_test_server,
    wait_until,
)
from tests.support.stack import all_gone, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture()
def http_server(count_dir: Path) -> Iterator[ServerProcess]:
    with start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as server:
        yield server


@pytest.fixture()
def sse_server(count_dir: Path) -> Iterator[ServerProcess]:
    with start_test_server("sse", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as server:
        yield server


def test_calls_over_all_three_transports(
    make_stack: Callable[..., Any], count_dir: Path, http_server: ServerProcess, sse_server: ServerProcess
) -> None:
    stack = make_stack(
        {
            "local": stdio_server(count_dir),
            "remote": {"transport": "http", "url": http_server.url},
            "legacy": {"transport": "sse", "url": sse_server.url},
        }
    )
    stack.start_worker()
    for i, server in enumerate(["local", "remote", "legacy"]):
        result = stack.queue.call(f"{server}/add", {"a": 40, "b": i}, timeout=30)
        assert result.success, result
        assert result.server_name == server
        assert result.structured == {"result": 40 + i}
        assert result.data["isError"] is False
        assert result.error_code is None
        assert result.execution_time_ms > 0
    # The handle API gives the same result as call().
    handle = stack.queue.submit("add", {"a": 1, "b": 1}, server="remote", timeout=30)
    assert handle.result(60).structured == {"result": 2}


def test_tool_map_published_and_bare_names_route(
    make_stack: Callable[..., Any], count_dir: Path, http_server: ServerProcess
) -> None:
    stack = make_stack(
        {
            "local": stdio_server(count_dir),
            "echoer": {"transport": "http", "url": http_server.url, "description": "only echo"},
        }
    )
    stack.start_worker()
    assert stack.queue.discover()["ok"]
    tools = stack.queue.tools()
    by_server: dict[str, set[str]] = {}
    for t in tools:
        by_server.setdefault(t["server"], set()).add(t["name"])
        assert "inputSchema" in t
    assert {"add", "count", "math.mul", "echo"} <= by_server["local"]
    assert by_server["local"] == by_server["echoer"]
    # Every tool is on both servers, so bare names are ambiguous...
    ambiguous = stack.queue.call("add", {"a": 1, "b": 2}, timeout=30)
    assert ambiguous.error_code == "ambiguous_tool"
    assert "'local/add'" in ambiguous.error and "'echoer/add'" in ambiguous.error
    assert sorted(ambiguous.details["servers"]) == ["echoer", "local"]
    # ...and a dotted tool name routes with the qualified form.
    result = stack.queue.call("local/math.mul", {"a": 6, "b": 7}, timeout=30)
    assert result.structured == {"result": 42}, result
    servers = {s["name"]: s for s in stack.queue.servers()}
    assert servers["echoer"]["description"] == "only echo"
    assert servers["local"]["tools"] == len(by_server["local"])
    assert servers["local"]["protocol_version"]


def test_bare_name_routes_when_one_server_offers_it(make_stack: Callable[..., Any], count_dir: Path) -> None:
    command, args = stdio_command_for_test_server("--only-echo")
    stack = make_stack(
        {
            "full": stdio_server(count_dir),
            "small": {"command": command, "args": args},
        }
    )
    stack.start_worker()
    result = stack.queue.call("add", {"a": 2, "b": 40}, timeout=30)
    assert result.success and result.server_name == "full"
    assert result.structured == {"result": 42}
    assert stack.queue.call("echo", {"text": "x"}, timeout=30).error_code == "ambiguous_tool"
    assert stack.queue.call("echo", {"text": "x"}, server="small", timeout=30).text == "x"


def test_bad_calls_get_specific_codes_and_never_reach_the_server(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack(
        {
            "local": stdio_server(count_dir),
            "off": {**stdio_server(count_dir), "enabled": False},
        }
    )
    stack.start_worker()
    q = stack.queue

    unknown = q.call("ad", {"a": 1, "b": 2}, timeout=30)
    assert unknown.error_code == "tool_not_found"
    assert "'add'" in unknown.error  # suggests the close match

    assert q.call("local/nope", {}, timeout=30).error_code == "tool_not_found"
    assert q.call("nowhere/add", {"a": 1, "b": 2}, timeout=30).error_code == "server_not_found"
    disabled = q.call("add", {"a": 1, "b": 2}, server="off", timeout=30)
    assert disabled.error_code == "server_disabled"
    assert "enabled: false" in disabled.error

    invalid = q.call("count", {"key": 7}, timeout=30)
    assert invalid.error_code == "invalid_arguments"
    # "key" looks like a secret's name, so its value is not quoted back.
    assert "at 'key': the value fails 'type'" in invalid.error
    wrong_type = q.call("strict", {"n": "seven", "mode": "a"}, timeout=30)
    assert "at 'n': 'seven' is not of type 'integer'" in wrong_type.error
    missing = q.call("count", {}, timeout=30)
    assert missing.error_code == "invalid_arguments" and "'key' is a required property" in missing.error
    enum = q.call("strict", {"n": 1, "mode": "c"}, timeout=30)
    assert enum.error_code == "invalid_arguments"
    assert read_count(count_dir, "k") == 0  # nothing was sent

    ran = q.call("count", {"key": "k"}, timeout=30)
    assert ran.success and read_count(count_dir, "k") == 1

    tool_error = q.call("fail", {"message": "boom"}, timeout=30)
    assert tool_error.error_code == "tool_error" and not tool_error.success
    assert tool_error.data is not None and tool_error.data["isError"] is True
    assert "boom" in tool_error.text  # the tool's own content is kept


def test_concurrent_calls_share_one_session(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir, max_sessions=1)})
    stack.start_worker(concurrency=16)
    handles = [stack.queue.submit("concurrency", {"key": "c", "ms": 300}, timeout=30) for _ in range(12)]
    results = [h.result(60) for h in handles]
    assert all(r.success for r in results), results
    _, peak = read_concurrency(count_dir, "c")
    assert peak > 1, "calls were serialised instead of multiplexed"
    pids = {stack.queue.call("pid", {}, timeout=30).structured["result"] for _ in range(5)}
    assert len(pids) == 1, "one server process (one session) serves every call"


def test_max_sessions_spreads_load(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir, max_sessions=3)})
    stack.start_worker(concurrency=16)
    stack.queue.call("pid", {}, timeout=30)
    handles = [stack.queue.submit("concurrency", {"key": "m", "ms": 400}, timeout=30) for _ in range(12)]
    assert all(h.result(60).success for h in handles)
    worker = stack.workers[0]
    servers = [p for p in descendants(worker.pid)]
    assert len(servers) >= 2, f"expected several stdio sessions, found processes {servers}"


def test_killed_stdio_server_is_replaced_transparently(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    import os
    import signal

    # Idempotent: a call that races the death (written to the pipe before the
    # worker has read the server's EOF) cannot be told from one the server
    # received, so only a call that may be repeated is retried on a new server.
    stack = make_stack(
        {"local": stdio_server(count_dir, idempotent=True, retry_attempts=2, retry_delay=0.05)}
    )
    stack.start_worker()
    first = stack.queue.call("pid", {}, timeout=30)
    server_pid = first.structured["result"]
    os.kill(server_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server_pid), 10, message="stdio server did not die")
    after = stack.queue.call("add", {"a": 1, "b": 1}, timeout=30)
    assert after.success, after
    assert after.attempts in (1, 2)  # 2: it raced the death and was sent again
    assert stack.queue.call("pid", {}, timeout=30).structured["result"] != server_pid


@pytest.mark.parametrize("protocol", ["legacy", "auto"])
def test_restarted_http_server_is_reconnected(
    make_stack: Callable[..., Any], http_server: ServerProcess, protocol: str
) -> None:
    stack = make_stack({"remote": {"transport": "http", "url": http_server.url, "protocol": protocol}})
    stack.start_worker()
    assert stack.queue.call("add", {"a": 1, "b": 2}, timeout=30).success
    # A handshake-era session dies with the server: the new one answers
    # "Session not found" (404) until the client initializes again.
    http_server.restart()
    after = stack.queue.call("add", {"a": 2, "b": 2}, timeout=30)
    assert after.success, after
    assert after.structured == {"result": 4}


def test_restarted_sse_server_is_reconnected(
    make_stack: Callable[..., Any], sse_server: ServerProcess
) -> None:
    stack = make_stack({"legacy": {"transport": "sse", "url": sse_server.url}})
    stack.start_worker()
    assert stack.queue.call("add", {"a": 1, "b": 2}, timeout=30).success
    sse_server.restart()
    wait_until(
        lambda: stack.queue.call("add", {"a": 2, "b": 2}, timeout=30).success,
        20,
        interval=0.2,
        message="SSE calls did not recover after a server restart",
    )


def test_server_that_never_answers_times_out_within_deadline(make_stack: Callable[..., Any]) -> None:
    hang = start_hang_server()
    try:
        stack = make_stack(
            {
                "stuck": {
                    "transport": "http",
                    "url": hang.url,
                    "timeout": 2,
                    "connect_timeout": 1.5,
                    "retry_attempts": 0,  # one attempt: its own deadline is what is tested
                }
            }
        )
        stack.start_worker()
        started = time.monotonic()
        result = stack.queue.call("stuck/anything", {}, timeout=2, wait=30)
        elapsed = time.monotonic() - started
        assert result.error_code == "timeout", result
        assert "within" in result.error
        assert elapsed < 6, f"timeout took {elapsed:.1f}s"
    finally:
        hang.stop()


def test_unreachable_server_is_connection_error(make_stack: Callable[..., Any]) -> None:
    from tests.support.procs import free_port

    url = f"http://127.0.0.1:{free_port()}/mcp"
    stack = make_stack({"down": {"transport": "http", "url": url, "retry_attempts": 0}})
    stack.start_worker()
    result = stack.queue.call("down/add", {"a": 1, "b": 1}, timeout=10)
    assert result.error_code == "connection_error", result
    assert "cannot connect" in result.error


def test_server_everything_over_stdio_and_http(make_stack: Callable[..., Any]) -> None:
    node, args = everything_stdio_command()
    with start_everything_server() as remote:
        stack = make_stack(
            {
                "ev-stdio": {"transport": "stdio", "command": node, "args": args},
                "ev-http": {"transport": "http", "url": remote.url},
            }
        )
        stack.start_worker()
        for server in ("ev-stdio", "ev-http"):
            echo = stack.queue.call("echo", {"message": "hi"}, server=server, timeout=60)
            assert echo.success, echo
            assert "hi" in echo.text
            total = stack.queue.call("get-sum", {"a": 2, "b": 40}, server=server, timeout=60)
            assert total.success, total
            assert "42" in total.text
            structured = stack.queue.call("get-structured-content", {"location": "New York"}, server=server)
            assert structured.success, structured
            assert isinstance(structured.structured, dict) and structured.structured
            bad = stack.queue.call("get-sum", {"a": "two", "b": 1}, server=server, timeout=60)
            assert bad.error_code == "invalid_arguments"


def test_worker_stop_leaves_no_stdio_server_behind(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"a": stdio_server(count_dir), "b": stdio_server(count_dir, max_sessions=2)})
    worker = stack.start_worker()
    pids = {stack.queue.call(f"{s}/pid", {}, timeout=30).structured["result"] for s in ("a", "b")}
    children = descendants(worker.pid)
    assert pids <= set(children)
    worker.stop()
    wait_until(lambda: all_gone(children), 15, message=lambda: f"left running: {children}")


def test_killed_worker_leaves_no_stdio_server_behind(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"a": stdio_server(count_dir)})
    worker = stack.start_worker()
    server_pid = stack.queue.call("pid", {}, timeout=30).structured["result"]
    assert pid_alive(server_pid)
    worker.kill()  # SIGKILL: no shutdown code runs; the parent-death signal must do it
    wait_until(lambda: not pid_alive(server_pid), 15, message="stdio server outlived its SIGKILLed worker")
