"""The HTTP API against a real fleet: a private redis-server, a real Celery
worker, the test MCP server over stdio, and the app served by a real uvicorn
server (in a thread, or as `mcpq api` in a subprocess), spoken to with httpx."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from mcpq.producer.api import create_app
from tests.support.procs import free_port, wait_for_port, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "integration-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Stack:
    s: Stack = make_stack(
        {
            "local": stdio_server(count_dir, description="the test server"),
            "twin": stdio_server(count_dir),  # offers the same tools: bare names are ambiguous
            "down": {
                "url": f"http://127.0.0.1:{free_port()}/mcp",
                "circuit_breaker_threshold": 1,
                "circuit_breaker_timeout": 60,
                "retry_attempts": 0,
                "connect_timeout": 3,
                "timeout": 5,
                "description": "nobody listens here",
            },
        },
        env={"MCPQ_ADMIN_TOKEN": TOKEN},
    )
    s.start_worker()
    return s


@contextmanager
def served(stack: Stack) -> Iterator[httpx.Client]:
    """create_app(settings=stack.settings) behind a real uvicorn server on a free port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings=stack.settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 30, message="uvicorn did not start")
        assert server.started, "uvicorn exited while starting"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture()
def api(stack: Stack) -> Iterator[httpx.Client]:
    with served(stack) as client:
        yield client


def call(
    api: httpx.Client, tool: str, arguments: dict[str, Any] | None = None, **extra: Any
) -> httpx.Response:
    return api.post("/mcp/call", json={"tool": tool, "arguments": arguments or {}, **extra}, headers=ADMIN)


def poll(api: httpx.Client, url: str, timeout: float = 60.0) -> dict[str, Any]:
    """GET a call's status until it is ready (deadline, short interval, no fixed sleep)."""

    def ready() -> dict[str, Any] | None:
        answer = api.get(url, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["state"] in ("PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE"), body
        return body if body["ready"] else None

    return wait_until(ready, timeout, interval=0.05, message=f"{url} never became ready")


def error_of(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert body["error_code"] == code, body
    assert body["error"]
    return body


def test_listing_and_calls(stack: Stack, api: httpx.Client) -> None:
    assert stack.queue.discover()["ok"]

    servers = api.get("/mcp/servers")
    assert servers.status_code == 200
    by_name = {s["name"]: s for s in servers.json()}
    assert set(by_name) == {"local", "twin", "down"}
    assert by_name["local"]["description"] == "the test server"
    assert by_name["local"]["transport"] == "stdio" and by_name["local"]["tools"] >= 4
    assert by_name["local"]["protocol_version"]
    assert all("args" not in s for s in by_name.values())

    local_tools = api.get("/mcp/servers/local/tools").json()
    names = {t["name"] for t in local_tools}
    assert {"add", "math.mul", "fail", "echo"} <= names
    add = next(t for t in local_tools if t["name"] == "add")
    assert add["server"] == "local" and add["ambiguous"] is True and "inputSchema" in add
    every = api.get("/mcp/tools").json()
    assert {t["server"] for t in every} == {"local", "twin"}
    error_of(api.get("/mcp/servers/nope/tools"), 404, "server_not_found")

    ok = call(api, "local/add", {"a": 2, "b": 40})
    assert ok.status_code == 200, ok.text
    result = ok.json()
    assert result["success"] is True and result["error_code"] is None
    assert result["data"]["structuredContent"] == {"result": 42}
    assert result["server_name"] == "local" and result["tool_name"]
    routed = call(api, "math.mul", {"a": 6, "b": 7}, server="twin", timeout=30)
    assert routed.status_code == 200 and routed.json()["data"]["structuredContent"] == {"result": 42}

    ambiguous = error_of(call(api, "add", {"a": 1, "b": 2}), 409, "ambiguous_tool")
    assert sorted(ambiguous["details"]["servers"]) == ["local", "twin"]
    assert ambiguous["success"] is False  # the body is the ToolResult
    invalid = error_of(call(api, "local/add", {"a": "x", "b": 2}), 422, "invalid_arguments")
    assert invalid["server_name"] == "local"
    error_of(call(api, "no_such_tool"), 404, "tool_not_found")
    error_of(call(api, "nope/add", {"a": 1, "b": 2}), 404, "server_not_found")
    # The tool ran and said isError: the exchange worked, success=false says how.
    failed = call(api, "local/fail", {"message": "boom"})
    assert failed.status_code == 200, failed.text
    assert failed.json()["success"] is False and failed.json()["error_code"] == "tool_error"
    assert failed.json()["data"]["isError"] is True and "boom" in str(failed.json()["data"]["content"])

    # The live server enforces auth like the app does in-process.
    error_of(api.post("/mcp/call", json={"tool": "local/add"}), 401, "unauthorized")
    error_of(call(api, "local/add", {"a": 1, "b": 1}, bogus=True), 422, "invalid_arguments")

    doc = api.get("/openapi.json").json()
    endpoints = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert endpoints == {
        ("GET", "/mcp/servers"),
        ("GET", "/mcp/servers/{name}/tools"),
        ("GET", "/mcp/tools"),
        ("GET", "/mcp/health"),
        ("GET", "/mcp/circuit-breakers"),
        ("POST", "/mcp/call"),
        ("POST", "/mcp/calls"),
        ("GET", "/mcp/calls/{task_id}"),
        ("GET", "/mcp/calls/{task_id}/events"),
        ("DELETE", "/mcp/calls/{task_id}"),
        ("POST", "/mcp/circuit-breakers/{name}/reset"),
        ("POST", "/mcp/servers/{name}/reconnect"),
    }
    assert "ToolResultModel" in doc["components"]["schemas"]
    assert "swagger" in api.get("/docs").text.lower()


def test_enqueue_a_batch_and_poll_each_call(api: httpx.Client) -> None:
    batch = [
        {"tool": "local/add", "arguments": {"a": 1, "b": 2}},
        {"tool": "math.mul", "server": "twin", "arguments": {"a": 3, "b": 4}, "timeout": 30},
        {"tool": "local/fail", "arguments": {"message": "expected"}},
    ]
    accepted = api.post("/mcp/calls", json=batch, headers=ADMIN)
    assert accepted.status_code == 202, accepted.text
    calls = accepted.json()["calls"]
    assert [c["tool"] for c in calls] == ["local/add", "twin/math.mul", "local/fail"]
    assert len({c["task_id"] for c in calls}) == 3

    done = [poll(api, c["url"]) for c in calls]
    assert all(d["state"] == "SUCCESS" for d in done)  # the task finished; the result says how
    assert [d["task_id"] for d in done] == [c["task_id"] for c in calls]
    add, mul, fail = (d["result"] for d in done)
    assert add["success"] and add["data"]["structuredContent"] == {"result": 3}
    assert (
        mul["success"] and mul["server_name"] == "twin" and mul["data"]["structuredContent"] == {"result": 12}
    )
    assert fail["success"] is False and fail["error_code"] == "tool_error"
    assert add["request_id"] == calls[0]["task_id"]

    single = api.post("/mcp/calls", json={"tool": "local/echo", "arguments": {"text": "hi"}}, headers=ADMIN)
    assert single.status_code == 202
    echoed = poll(api, single.headers["location"])["result"]
    assert echoed["success"] and "hi" in str(echoed["data"]["content"])
    error_of(api.get(single.headers["location"]), 401, "unauthorized")


def test_concurrent_waiting_calls_each_get_their_own_result(api: httpx.Client) -> None:
    # Every waiting request awaits its own result on the one listener: none may
    # see another's result, and none may starve the open endpoints meanwhile.
    def one(i: int) -> tuple[int, httpx.Response]:
        return i, call(api, "local/add", {"a": i, "b": 1000})

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        assert api.get("/mcp/circuit-breakers").status_code == 200
        for future in concurrent.futures.as_completed(futures, timeout=90):
            i, answer = future.result()
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["structuredContent"] == {"result": i + 1000}


def test_breakers_reset_reconnect_and_health(stack: Stack, api: httpx.Client) -> None:
    down = error_of(call(api, "down/anything"), 503, "connection_error")
    assert down["server_name"] == "down"
    breakers = api.get("/mcp/circuit-breakers").json()
    assert breakers["down"]["state"] == "open" and breakers["local"]["state"] == "closed"
    assert breakers["down"]["last_error"] == "connection_error"

    shed = call(api, "down/anything")
    error_of(shed, 503, "circuit_open")
    assert 1 <= int(shed.headers["retry-after"]) <= 60

    reset = api.post("/mcp/circuit-breakers/down/reset", headers=ADMIN)
    assert reset.status_code == 200 and reset.json() == {"server": "down", "cleared": True, "state": "closed"}
    assert api.get("/mcp/circuit-breakers").json()["down"]["state"] == "closed"
    error_of(api.post("/mcp/circuit-breakers/nope/reset", headers=ADMIN), 404, "server_not_found")

    # Reconnect: the worker drops its stdio session, so a new server process answers.
    before = call(api, "local/pid").json()["data"]["structuredContent"]["result"]
    reconnected = api.post("/mcp/servers/local/reconnect", headers=ADMIN)
    assert reconnected.status_code == 200 and reconnected.json()["server"] == "local"

    def new_pid() -> bool:
        answer = call(api, "local/pid")
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["data"]["structuredContent"]["result"] != before)

    wait_until(new_pid, 30, interval=0.1, message="the worker never reopened its session to 'local'")
    error_of(api.post("/mcp/servers/nope/reconnect", headers=ADMIN), 404, "server_not_found")

    health = api.get("/mcp/health", params={"wait": 30})
    assert health.status_code == 200, health.text
    report = health.json()
    assert set(report["servers"]) == {"local", "twin", "down"}
    assert report["servers"]["local"]["healthy"] is True and report["servers"]["local"]["latency_ms"] > 0
    assert report["servers"]["down"]["healthy"] is False and report["servers"]["down"]["error_code"]
    assert report["healthy"] is False
    only_local = api.get("/mcp/health", params={"server": "local", "wait": 30}).json()
    assert only_local["healthy"] is True and set(only_local["servers"]) == {"local"}
    error_of(api.get("/mcp/health", params={"server": "nope", "wait": 30}), 404, "server_not_found")


def test_mcpq_api_command_serves_the_app(stack: Stack) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcpq.producer.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90) as api:
            assert {s["name"] for s in api.get("/mcp/servers").json()} == {"local", "twin", "down"}
            answer = call(api, "local/add", {"a": 20, "b": 22})
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["structuredContent"] == {"result": 42}
            error_of(api.post("/mcp/call", json={"tool": "local/add"}), 401, "unauthorized")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    text = output.decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text and "Traceback" not in text, text
