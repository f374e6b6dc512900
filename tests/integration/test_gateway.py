"""``mcpq gateway`` against a real fleet: a private redis-server, a real Celery
worker, two real upstream MCP servers (the test server over stdio, and a second
copy offering only ``echo``), a real gateway process, and the SDK's ``Client``
over Streamable HTTP (handshake era and 2026-07-28) and over stdio.

What ran upstream is read from the test server's own records (``count``,
``wait_for_cancel``'s events); every wait is on an observable fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import MCPQ, TOKEN, GatewayProcess, http_client
from tests.support.procs import free_port, read_count, read_events, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000
MODES = ["legacy", "2026-07-28"]


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fleet's test servers record what really ran (shared by this module's tests)."""
    return tmp_path_factory.mktemp("gateway-counts")


@pytest.fixture(scope="module")
def fleet(redis_url: str, counts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """alpha: every test tool over stdio; beta: only ``echo`` (so ``echo`` is ambiguous).
    One fleet for the module: the tests use keys of their own."""
    stack = Stack(
        redis_url,
        tmp_path_factory.mktemp("gateway-fleet"),
        {
            "alpha": stdio_server(counts, retry_attempts=0),
            "beta": stdio_server(counts, "--only-echo", "--name", "beta-server", retry_attempts=0),
        },
    )
    try:
        stack.start_worker()
        wait_until(lambda: len(stack.queue.tools()) >= 10, timeout=60, message="the fleet published no tools")
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def gateway(fleet: Stack) -> Iterator[GatewayProcess]:
    process = GatewayProcess(fleet).start(min_tools=10)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def own_gateway(fleet: Stack) -> Iterator[GatewayProcess]:
    """A gateway of the test's own, for tests that stop or kill it."""
    process = GatewayProcess(fleet).start(min_tools=10)
    try:
        yield process
    finally:
        process.stop()


def key() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def stdio_client(fleet: Stack, *args: str) -> AsyncIterator[Client]:
    """The SDK's Client launching ``mcpq gateway --stdio`` as a desktop client does."""
    env = {k: v for k, v in fleet.env.items() if k.startswith(("MCPQ_", "PATH", "PYTHON", "HOME"))}
    params = StdioServerParameters(command=MCPQ, args=["gateway", "--stdio", *args], env=env)
    async with Client(params, mode="legacy") as client:
        yield client


def run(coro: Any) -> Any:
    return anyio.run(lambda: coro)


# --------------------------------------------------------------------------- catalog


@pytest.mark.parametrize("mode", MODES)
def test_tools_list_is_the_fleet_map_with_ambiguous_tools_qualified(
    fleet: Stack, gateway: GatewayProcess, mode: str
) -> None:
    fleet_tools = fleet.queue.tools()

    async def main() -> list[types.Tool]:
        async with http_client(gateway, mode) as client:
            return (await client.list_tools()).tools

    listed = {t.name: t for t in run(main())}
    assert "echo" not in listed, "a tool two servers offer must not keep its bare name"
    assert {"alpha__echo", "beta__echo", "add", "math.mul", "strict"} <= set(listed)
    assert len(listed) == len(fleet_tools), "one exposed tool per (server, tool)"
    for row in fleet_tools:
        name = f"{row['server']}__{row['name']}" if row["ambiguous"] else row["name"]
        shown = listed[name].model_dump(mode="json", by_alias=True, exclude_none=True)
        for field in ("description", "inputSchema", "outputSchema", "annotations"):
            assert shown.get(field) == row.get(field), (name, field)


def test_servers_option_exposes_only_those_servers_and_refuses_the_rest(fleet: Stack) -> None:
    process = GatewayProcess(fleet, "--servers", "beta").start()
    try:

        async def main() -> tuple[list[str], MCPError]:
            async with http_client(process) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("add", {"a": 1, "b": 2})
                echoed = await client.call_tool("echo", {"text": "only beta"})
                assert echoed.meta is not None and echoed.meta["mcpq/call"]["server"] == "beta"
                return names, refused.value

        names, refused = run(main())
    finally:
        process.stop()
    assert names == ["echo"], "beta's echo is unambiguous once alpha is filtered out"
    assert refused.error.code == types.INVALID_PARAMS
    assert refused.error.data["mcpq_code"] == "tool_not_found"


def test_tools_option_exposes_only_matching_tools(fleet: Stack) -> None:
    process = GatewayProcess(fleet, "--tools", "math.*,alpha/echo").start()
    try:

        async def main() -> list[str]:
            async with http_client(process) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                echoed = await client.call_tool("echo", {"text": "alpha's"})
                assert echoed.meta is not None and echoed.meta["mcpq/call"]["server"] == "alpha"
                return names

        assert run(main()) == ["echo", "math.mul"]
    finally:
        process.stop()


def test_a_closed_session_is_forgotten(own_gateway: GatewayProcess) -> None:
    """The gateway remembers handshake-era sessions (for list_changed) only while they are open."""
    sessions = ("mcpq_gateway_sessions", ())

    async def main() -> float:
        async with http_client(own_gateway, "legacy") as client:
            await client.list_tools()
            return gateway_samples(own_gateway)[sessions]

    assert run(main()) == 1
    wait_until(lambda: gateway_samples(own_gateway)[sessions] == 0, timeout=30)


def test_tools_list_changed_is_sent_when_the_fleet_map_changes(
    make_stack: Callable[..., Stack], count_dir: Path
) -> None:  # a fleet of its own: it changes the tool map
    stack = make_stack({"alpha": stdio_server(count_dir, "--only-echo", retry_attempts=0)})
    stack.start_worker()
    process = GatewayProcess(stack).start()
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async def main() -> tuple[list[str], list[str]]:
        async with http_client(process, message_handler=on_message) as client:
            before = [t.name for t in (await client.list_tools()).tools]
            # A second worker with a second server: the fleet's map gains its tools.
            doc = {
                "mcp_servers": {
                    "alpha": stdio_server(count_dir, "--only-echo", retry_attempts=0),
                    "gamma": stdio_server(count_dir, retry_attempts=0),
                }
            }
            stack.config_path.write_text(json.dumps(doc))
            await anyio.to_thread.run_sync(stack.start_worker)
            with anyio.fail_after(30):
                await changed.wait()
            after = [t.name for t in (await client.list_tools(cache_mode="refresh")).tools]
            return before, after

    try:
        before, after = run(main())
    finally:
        process.stop()
    assert before == ["echo"]
    assert {"alpha__echo", "gamma__echo", "add"} <= set(after)


# --------------------------------------------------------------------------- calls


@pytest.mark.parametrize("mode", MODES)
def test_calls_pass_results_through_unchanged(fleet: Stack, gateway: GatewayProcess, mode: str) -> None:
    async def main() -> dict[str, types.CallToolResult]:
        async with http_client(gateway, mode) as client:
            return {
                "add": await client.call_tool("add", {"a": 2, "b": 40}),
                "beta": await client.call_tool("beta__echo", {"text": "from beta"}),
                "alpha": await client.call_tool("alpha__echo", {"text": "from alpha"}),
                "fail": await client.call_tool("fail", {"message": "boom"}),
            }

    got = run(main())
    assert got["add"].structured_content == {"result": 42} and not got["add"].is_error
    assert got["beta"].content[0].text == "from beta"  # type: ignore[union-attr]
    assert got["beta"].meta["mcpq/call"]["server"] == "beta"  # type: ignore[index]
    assert got["alpha"].meta["mcpq/call"]["server"] == "alpha"  # type: ignore[index]
    # The upstream isError result, content and all: the tool ran and said no.
    assert got["fail"].is_error and "boom" in got["fail"].content[0].text  # type: ignore[union-attr]
    # Each result names the mcpq call, whose stored result is the same.
    stored = fleet.queue.get(got["add"].meta["mcpq/call"]["id"]).result(10)  # type: ignore[index]
    assert stored.success and stored.structured == {"result": 42}


@pytest.mark.parametrize("mode", MODES)
def test_progress_reaches_the_clients_progress_token(
    fleet: Stack, gateway: GatewayProcess, counts: Path, mode: str
) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async def main() -> types.CallToolResult:
        async with http_client(gateway, mode) as client:
            return await client.call_tool(
                "progress", {"key": key(), "steps": 3, "ms": 300}, progress_callback=on_progress
            )

    result = run(main())
    assert result.structured_content == {"result": 3}
    # Coalesced at most every 0.1 s by the worker: 300 ms apart, every step arrives.
    assert updates == [(float(i), 3.0, f"step {i} of 3") for i in (1, 2, 3)]


def test_a_cancelled_request_cancels_the_running_call(
    fleet: Stack, gateway: GatewayProcess, counts: Path
) -> None:
    k = key()

    async def main() -> None:
        async with http_client(gateway, "legacy") as client, anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "wait_for_cancel", {"key": k, "ms": HOLD_MS})
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: read_events(counts, k), timeout=30))
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled

    run(main())
    wait_until(lambda: "cancelled" in " ".join(read_events(counts, k)), timeout=30)
    assert [e.split()[0] for e in read_events(counts, k)] == ["started", "cancelled"]


def test_a_client_that_disconnects_mid_call_leaves_it_to_finish_once(
    fleet: Stack, gateway: GatewayProcess, counts: Path
) -> None:
    """A handshake-era client whose connection drops has not cancelled: the call finishes, once."""
    k = key()
    headers = {
        **gateway.headers,
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "disconnecting", "version": "1"},
        },
    }
    with httpx.Client(timeout=30) as http:
        reply = http.post(gateway.url, json=init, headers=headers)
        assert reply.status_code == 200, reply.text
        session = {**headers, "Mcp-Session-Id": reply.headers["mcp-session-id"]}
        http.post(
            gateway.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session
        )
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "wait_for_cancel", "arguments": {"key": k, "ms": 1500}},
        }
        with http.stream("POST", gateway.url, json=call, headers=session) as stream:
            assert stream.status_code == 200
            wait_until(lambda: read_events(counts, k), timeout=30)
        # The response stream is closed unread, and then the whole connection.
    wait_until(lambda: len(read_events(counts, k)) >= 2, timeout=30)
    assert [e.split()[0] for e in read_events(counts, k)] == ["started", "finished"]


def test_stdio_gateway_lists_calls_relays_progress_and_cancels(fleet: Stack, counts: Path) -> None:
    updates: list[float] = []
    k = key()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append(progress)

    async def main() -> tuple[list[str], dict[str, types.CallToolResult]]:
        async with stdio_client(fleet) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            got = {
                "add": await client.call_tool("add", {"a": 1, "b": 2}),
                "beta": await client.call_tool("beta__echo", {"text": "b"}),
                "fail": await client.call_tool("fail", {"message": "stdio boom"}),
                "progress": await client.call_tool(
                    "progress", {"key": key(), "steps": 2, "ms": 300}, progress_callback=on_progress
                ),
            }
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "wait_for_cancel", {"key": k, "ms": HOLD_MS})
                await anyio.to_thread.run_sync(lambda: wait_until(lambda: read_events(counts, k), timeout=30))
                tg.cancel_scope.cancel()  # notifications/cancelled over stdio
            return names, got

    names, got = run(main())
    assert {"add", "alpha__echo", "beta__echo"} <= set(names)
    assert got["add"].structured_content == {"result": 3}
    assert got["beta"].meta is not None and got["beta"].meta["mcpq/call"]["server"] == "beta"
    assert got["fail"].is_error and "stdio boom" in got["fail"].content[0].text  # type: ignore[union-attr]
    assert got["progress"].structured_content == {"result": 2} and updates == [1.0, 2.0]
    wait_until(lambda: len(read_events(counts, k)) >= 2, timeout=30)
    assert [e.split()[0] for e in read_events(counts, k)] == ["started", "cancelled"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", MODES)
def test_unknown_tool_and_invalid_arguments_are_protocol_errors_and_nothing_runs(
    fleet: Stack, gateway: GatewayProcess, counts: Path, mode: str
) -> None:
    k = key()

    async def main() -> tuple[MCPError, MCPError]:
        async with http_client(gateway, mode) as client:
            with pytest.raises(MCPError) as unknown:
                await client.call_tool("no_such_tool", {})
            with pytest.raises(MCPError) as invalid:
                await client.call_tool("slow_count", {"key": k, "ms": "soon"})
            return unknown.value, invalid.value

    unknown, invalid = run(main())
    assert unknown.error.code == types.INVALID_PARAMS
    assert unknown.error.data["mcpq_code"] == "tool_not_found" and "no_such_tool" in unknown.error.message
    assert invalid.error.code == types.INVALID_PARAMS
    assert invalid.error.data["mcpq_code"] == "invalid_arguments"
    assert "inputSchema" in invalid.error.message and "'ms'" in invalid.error.message
    assert read_count(counts, k) == 0, "invalid arguments must not reach the server"


def test_requests_without_the_token_get_401_and_health_needs_none(gateway: GatewayProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    missing = httpx.post(gateway.url, json=body, timeout=10)
    wrong = httpx.post(gateway.url, json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in missing.text
    health = httpx.get(gateway.url.replace("/mcp", "/healthz"), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_oversized_request_is_refused_before_it_is_queued(gateway: GatewayProcess) -> None:
    big = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {"text": "x" * (5 * 1024 * 1024)}},
    }
    reply = httpx.post(
        gateway.url,
        content=json.dumps(big),
        headers={
            **gateway.headers,
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2026-07-28",
        },
        timeout=30,
    )
    assert reply.status_code == 413, (reply.status_code, reply.text[:300])


def test_a_foreign_host_header_is_refused(gateway: GatewayProcess) -> None:
    """DNS-rebinding protection: a page on evil.example resolving to 127.0.0.1 gets nothing."""
    reply = httpx.post(
        gateway.url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={**gateway.headers, "Host": "evil.example", "Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert reply.status_code in (400, 403, 421), reply.status_code


def test_serving_the_network_without_a_token_is_refused(fleet: Stack) -> None:
    env = {k: v for k, v in fleet.env.items() if k != "MCPQ_GATEWAY_TOKEN"}
    done = subprocess.run(
        [MCPQ, "gateway", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "MCPQ_GATEWAY_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_redis_is_a_clear_error_everywhere_and_no_traceback(fleet: Stack) -> None:
    dead = f"redis://:pw-{uuid.uuid4().hex[:6]}@127.0.0.1:{free_port()}"
    env = {"MCPQ_BROKER_URL": f"{dead}/0", "MCPQ_RESULT_BACKEND": f"{dead}/1", "MCPQ_REDIS_URL": f"{dead}/2"}
    process = GatewayProcess(fleet, env=env).start(healthy=False)
    try:
        health = httpx.get(process.url.replace("/mcp", "/healthz"), timeout=10)

        async def main() -> tuple[MCPError, types.CallToolResult]:
            async with http_client(process) as client:
                with pytest.raises(MCPError) as listed:
                    await client.list_tools()
                return listed.value, await client.call_tool("add", {"a": 1, "b": 2})

        listed, called = run(main())
    finally:
        process.stop()
    assert health.status_code == 503 and "MCPQ_REDIS_URL" in health.json()["error"]
    assert listed.error.code == types.INTERNAL_ERROR
    assert listed.error.data["mcpq_code"] == "connection_error" and "MCPQ_REDIS_URL" in listed.error.message
    assert called.is_error and called.meta is not None
    assert called.meta["mcpq/error"]["code"] == "connection_error"
    log = process.log_tail(100_000)
    assert "Traceback" not in log and "pw-" not in log + health.text + listed.error.message


def test_gateway_logs_hold_no_arguments_results_or_token(own_gateway: GatewayProcess) -> None:
    gateway = own_gateway  # stopped below, to read its whole log
    planted = f"planted-{uuid.uuid4().hex}"

    async def main() -> None:
        async with http_client(gateway) as client:
            await client.call_tool("alpha__echo", {"text": planted})
            with pytest.raises(MCPError):
                await client.call_tool("strict", {"n": 1, "mode": planted})

    run(main())
    gateway.stop()
    log = gateway.log_path.read_text()
    assert planted not in log and TOKEN not in log


def test_gateway_restart_does_not_lose_a_call_the_fleet_is_running(
    fleet: Stack, own_gateway: GatewayProcess, counts: Path
) -> None:
    """Killing the gateway mid-call: the call is the fleet's, it finishes once."""
    gateway = own_gateway
    k = key()

    async def start_call() -> None:
        async with http_client(gateway) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "wait_for_cancel", {"key": k, "ms": 1500})
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: read_events(counts, k), timeout=30))
            await anyio.to_thread.run_sync(gateway.kill)
            tg.cancel_scope.cancel()

    with contextlib.suppress(Exception):  # the client's connection breaks, in whatever wrapping
        asyncio.run(start_call())
    wait_until(lambda: len(read_events(counts, k)) >= 2, timeout=30)
    assert [e.split()[0] for e in read_events(counts, k)] == ["started", "finished"]


# --------------------------------------------------------------------------- metrics


def gateway_samples(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the gateway's open ``/metrics``, parsed by prometheus_client's own parser."""
    reply = httpx.get(gateway.url.replace("/mcp", "/metrics"), timeout=10)
    assert reply.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def test_metrics_count_calls_by_exposed_tool_and_outcome(gateway: GatewayProcess) -> None:
    before = gateway_samples(gateway)

    async def main() -> None:
        async with http_client(gateway) as client:
            await client.call_tool("add", {"a": 1, "b": 1})
            await client.call_tool("add", {"a": 2, "b": 2})
            await client.call_tool("fail", {"message": "no"})
            for name, arguments in (("no_such_tool", {}), ("slow_count", {"key": key(), "ms": "x"})):
                with pytest.raises(MCPError):
                    await client.call_tool(name, arguments)

    run(main())
    after = gateway_samples(gateway)

    def added(tool: str, outcome: str) -> float:
        sample = ("mcpq_gateway_calls_total", (("outcome", outcome), ("tool", tool)))
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert added("add", "ok") == 2
    assert added("fail", "tool_error") == 1
    assert added("unknown", "tool_not_found") == 1, "invented names never become label values"
    assert added("slow_count", "invalid_arguments") == 1
    assert after[("mcpq_gateway_calls_in_flight", ())] == 0
    # The fleet-wide breakers, as the workers serve them.
    assert after[("mcpq_breaker_state", (("server", "alpha"), ("state", "closed")))] == 1
