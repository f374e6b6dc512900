"""Long calls as tasks (MCP Tasks extension, SEP-2663) on a real ``mcpq gateway``.

A private redis-server, a real Celery worker, the test MCP server over stdio,
a real gateway process, and a client speaking raw 2026-07-28 JSON-RPC over
HTTP (the SDK's client has no Tasks runtime): every request is its own HTTP
connection carrying the per-request ``_meta`` envelope, and declares
``io.modelcontextprotocol/tasks`` in its client capabilities or not.

What ran upstream is read from the test server's own records; every wait is
on an observable fact (a task's status, a recorded event).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.procs import read_count, read_events, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TASKS = "io.modelcontextprotocol/tasks"
VERSION = "2026-07-28"
#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000
TERMINAL = {"completed", "failed", "cancelled"}
_ids = itertools.count(1)


@pytest.fixture
def fleet(make_stack: Callable[..., Stack], count_dir: Path) -> Stack:
    stack = make_stack({"alpha": stdio_server(count_dir, retry_attempts=0)})
    stack.start_worker()
    return stack


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    """Gateways a test starts; all stopped at its end."""
    started: list[GatewayProcess] = []
    yield started
    for process in started:
        process.stop()


def start_gateway(
    fleet: Stack, started: list[GatewayProcess], *args: str, port: int | None = None
) -> GatewayProcess:
    process = GatewayProcess(fleet, *args, port=port)
    started.append(process)
    return process.start(min_tools=5)


def key() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


def rpc(
    gateway: GatewayProcess, method: str, params: dict[str, Any], *, tasks: bool = True
) -> dict[str, Any]:
    """One 2026-07-28 request on a new HTTP connection; the JSON-RPC response (``result`` or ``error``).

    :param tasks: declare the Tasks extension in this request's client capabilities.
    """
    request_id = next(_ids)
    meta = {
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "tasks-test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS: {}}} if tasks else {},
    }
    headers = {
        **gateway.headers,
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": VERSION,
        "Mcp-Method": method,
    }
    name = params.get("name") if method == "tools/call" else params.get("taskId")
    if isinstance(name, str):
        headers["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": meta}}
    with httpx.Client(timeout=60) as http:
        reply = http.post(gateway.url, json=body, headers=headers)
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data:")]
    else:
        messages = [reply.json()]
    answer = next((m for m in messages if m.get("id") == request_id), None)
    assert answer is not None, f"no response to {method} (HTTP {reply.status_code}): {reply.text[:2000]}"
    return dict(answer)


def result_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" in answer, f"expected a result, got {answer}"
    return dict(answer["result"])


def call(
    gateway: GatewayProcess, tool: str, arguments: dict[str, Any], *, tasks: bool = True
) -> dict[str, Any]:
    return result_of(rpc(gateway, "tools/call", {"name": tool, "arguments": arguments}, tasks=tasks))


def get_task(gateway: GatewayProcess, task_id: str) -> dict[str, Any]:
    return result_of(rpc(gateway, "tasks/get", {"taskId": task_id}))


def poll_until_terminal(gateway: GatewayProcess, task_id: str, timeout: float = 60) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def terminal() -> bool:
        seen.append(get_task(gateway, task_id))
        return seen[-1]["status"] in TERMINAL

    wait_until(terminal, timeout=timeout, interval=0.2, message=lambda: f"task not done: {seen[-1:]}")
    return seen[-1]


def text_of(tool_result: dict[str, Any]) -> str:
    return str(tool_result["content"][0]["text"])


def assert_task_shape(task: dict[str, Any], result_type: str) -> None:
    """The SEP-2663 Task fields (flat, ``ttlMs`` / ``pollIntervalMs`` in integer ms)."""
    assert task["resultType"] == result_type
    assert isinstance(task["taskId"], str) and task["taskId"]
    for stamp in ("createdAt", "lastUpdatedAt"):
        assert dt.datetime.fromisoformat(task[stamp].replace("Z", "+00:00")).tzinfo is not None
    assert isinstance(task["ttlMs"], int) and task["ttlMs"] > 0
    assert isinstance(task["pollIntervalMs"], int) and task["pollIntervalMs"] > 0
    assert "task" not in task and "ttl" not in task and "pollInterval" not in task


def test_slow_call_becomes_a_task_polled_from_new_connections(
    fleet: Stack, gateways: list[GatewayProcess], count_dir: Path
) -> None:
    gateway = start_gateway(fleet, gateways, "--task-after", "1")
    k = key()
    before = dt.datetime.now(dt.UTC)
    created = call(gateway, "slow_count", {"key": k, "ms": 4000})
    assert_task_shape(created, "task")
    assert created["status"] == "working"
    assert not {"result", "error", "inputRequests"} & created.keys()
    created_at = dt.datetime.fromisoformat(created["createdAt"].replace("Z", "+00:00"))
    assert before - dt.timedelta(seconds=1) <= created_at <= dt.datetime.now(dt.UTC)
    assert created["ttlMs"] == fleet.settings.result_expires * 1000
    task_id = created["taskId"]

    # Durably created: a tasks/get right away (another connection) knows it.
    first = get_task(gateway, task_id)
    assert first["taskId"] == task_id and first["status"] in {"working", "completed"}

    done = poll_until_terminal(gateway, task_id)
    assert_task_shape(done, "complete")
    assert done["status"] == "completed", done
    assert done["createdAt"] == created["createdAt"]
    assert text_of(done["result"]) == "1"
    assert done["result"]["_meta"]["mcpq/call"]["id"] == task_id  # the task id is the mcpq call id
    assert read_count(count_dir, k) == 1  # ran once, for all the polling

    # A fast call is answered directly, even for a client declaring the extension.
    fast = call(gateway, "echo", {"text": "hi"})
    assert fast["resultType"] == "complete" and "taskId" not in fast
    assert text_of(fast) == "hi"


def test_a_client_without_the_extension_gets_the_result(
    fleet: Stack, gateways: list[GatewayProcess], count_dir: Path
) -> None:
    gateway = start_gateway(fleet, gateways, "--task-after", "0.5", "--task-tools", "slow_count")
    k = key()
    answer = call(gateway, "slow_count", {"key": k, "ms": 2000}, tasks=False)
    assert answer["resultType"] == "complete" and "taskId" not in answer
    assert text_of(answer) == "1"
    assert read_count(count_dir, k) == 1
    # The task methods are the extension's: refused to a client that did not declare it.
    refused = rpc(gateway, "tasks/get", {"taskId": answer["_meta"]["mcpq/call"]["id"]}, tasks=False)
    assert refused["error"]["code"] == -32021
    assert TASKS in refused["error"]["data"]["requiredCapabilities"]["extensions"]
    # The gateway advertises the extension.
    discovered = result_of(rpc(gateway, "server/discover", {}))
    assert TASKS in discovered["capabilities"]["extensions"]


def test_a_task_cancelled(fleet: Stack, gateways: list[GatewayProcess], count_dir: Path) -> None:
    gateway = start_gateway(fleet, gateways, "--task-tools", "wait_for_cancel")
    k = key()
    created = call(gateway, "wait_for_cancel", {"key": k, "ms": HOLD_MS})
    assert_task_shape(created, "task")
    task_id = created["taskId"]
    wait_until(lambda: read_events(count_dir, k) == ["started"], timeout=30, message="the call never started")
    assert get_task(gateway, task_id)["status"] == "working"

    ack = result_of(rpc(gateway, "tasks/cancel", {"taskId": task_id}))
    assert ack.get("resultType") == "complete"
    assert not {"taskId", "status", "result", "error"} & ack.keys()

    wait_until(
        lambda: "cancelled" in read_events(count_dir, k), timeout=30, message="the server was not told"
    )
    done = poll_until_terminal(gateway, task_id)
    assert done["status"] == "cancelled", done
    assert "result" not in done
    assert read_events(count_dir, k) == ["started", "cancelled"]
    # Cancelling a finished task is acknowledged the same way.
    assert result_of(rpc(gateway, "tasks/cancel", {"taskId": task_id})).get("resultType") == "complete"


def test_unknown_tasks_and_removed_methods(fleet: Stack, gateways: list[GatewayProcess]) -> None:
    gateway = start_gateway(fleet, gateways)
    unknown = str(uuid.uuid4())
    assert rpc(gateway, "tasks/get", {"taskId": unknown})["error"]["code"] == -32602
    assert rpc(gateway, "tasks/cancel", {"taskId": unknown})["error"]["code"] == -32602
    assert rpc(gateway, "tasks/get", {"taskId": "not a call id!"})["error"]["code"] == -32602
    for removed in ("tasks/result", "tasks/list"):
        assert rpc(gateway, removed, {"taskId": unknown})["error"]["code"] == -32601


def test_the_gateway_restarted_while_a_task_runs(
    fleet: Stack, gateways: list[GatewayProcess], count_dir: Path
) -> None:
    first = start_gateway(fleet, gateways, "--task-tools", "slow_count")
    k = key()
    created = call(first, "slow_count", {"key": k, "ms": 6000})
    task_id = created["taskId"]
    wait_until(lambda: read_count(count_dir, k) == 1, timeout=30, message="the call never started")
    assert get_task(first, task_id)["status"] == "working"

    first.kill()  # SIGKILL: nothing of the gateway survives, the call goes on in the fleet
    second = start_gateway(fleet, gateways, "--task-tools", "slow_count", port=first.port)
    done = poll_until_terminal(second, task_id)
    assert done["status"] == "completed", done
    assert text_of(done["result"]) == "1"
    assert read_count(count_dir, k) == 1
