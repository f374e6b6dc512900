"""Quick checks that the test MCP servers and tests/support/procs.py work.

No Redis or Celery involved: these only prove the fixtures other integration
tests are built on.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.types import CallToolResult, TextContent

try:
    from tests.support import procs
except ImportError:  # pytest without the repo root on sys.path (no `pythonpath` setting)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support import procs


def _text(result: CallToolResult) -> str:
    assert result.content, result
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return block.text


async def _call(client: Client, tool: str, args: dict[str, Any] | None = None) -> CallToolResult:
    return await client.call_tool(tool, args or {})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra_args", [(), ("--stateless",)], ids=["stateful", "stateless"])
def test_http_test_server_tools(tmp_path: Path, extra_args: tuple[str, ...]) -> None:
    with procs.start_test_server(
        "http", extra_args=extra_args, env={"MCPQ_TEST_COUNT_DIR": str(tmp_path), "MCPQ_PROBE": "yes"}
    ) as server:
        assert server.url.endswith("/mcp")

        async def scenario() -> None:
            async with Client(server.url) as client:
                tools = {tool.name: tool for tool in (await client.list_tools()).tools}
                assert {"echo", "add", "math.mul", "read_only_echo", "strict", "count", "concurrency"} <= set(
                    tools
                )
                annotations = tools["read_only_echo"].annotations
                assert annotations is not None and annotations.read_only_hint and annotations.idempotent_hint
                assert tools["strict"].input_schema["properties"]["mode"]["enum"] == ["a", "b"]

                added = await _call(client, "add", {"a": 2, "b": 3})
                assert not added.is_error
                assert added.structured_content == {"result": 5}
                assert _text(added) == "5"
                assert _text(await _call(client, "math.mul", {"a": 6, "b": 7})) == "42"
                assert _text(await _call(client, "env_value", {"name": "MCPQ_PROBE"})) == "yes"
                assert _text(await _call(client, "pid")) == str(server.pid)
                assert len(_text(await _call(client, "big", {"n": 70_000}))) == 70_000

                failed = await _call(client, "fail", {"message": "boom"})
                assert failed.is_error and "boom" in _text(failed)
                rejected = await _call(client, "strict", {"n": 1, "mode": "c"})
                assert rejected.is_error

                assert [_text(await _call(client, "count", {"key": "k"})) for _ in range(3)] == [
                    "1",
                    "2",
                    "3",
                ]
                in_flight = await asyncio.gather(
                    *(_call(client, "concurrency", {"key": "c", "ms": 800}) for _ in range(3))
                )
                assert not any(r.is_error for r in in_flight)

        asyncio.run(scenario())
        assert procs.read_count(tmp_path, "k") == 3
        assert procs.read_concurrency(tmp_path, "c") == (0, 3)


@pytest.mark.timeout(60)
def test_sse_test_server_add() -> None:
    with procs.start_test_server("sse", extra_args=("--name", "sse-one")) as server:
        assert server.url.endswith("/sse")

        async def scenario() -> None:
            async with Client(sse_client(server.url)) as client:
                assert client.server_info is not None and client.server_info.name == "sse-one"
                result = await _call(client, "add", {"a": 40, "b": 2})
                assert not result.is_error and _text(result) == "42"

        asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_http_restart_serves_fresh_clients() -> None:
    with procs.start_test_server("http") as server:
        first_pid = server.pid

        async def pid_of_server() -> int:
            async with Client(server.url) as client:
                assert _text(await _call(client, "add", {"a": 1, "b": 1})) == "2"
                return int(_text(await _call(client, "pid")))

        assert asyncio.run(pid_of_server()) == first_pid
        port = server.port
        server.restart()
        assert server.port == port and server.pid != first_pid
        assert asyncio.run(pid_of_server()) == server.pid
        assert not procs.pid_alive(first_pid)


@pytest.mark.timeout(60)
def test_stdio_test_server_and_orphan_helpers(tmp_path: Path) -> None:
    marker = f"stdio-{os.getpid()}-{tmp_path.name}"
    command, args = procs.stdio_command_for_test_server("--name", marker)
    params = StdioServerParameters(command=command, args=args, env={"MCPQ_TEST_COUNT_DIR": str(tmp_path)})

    async def scenario() -> int:
        async with Client(params) as client:
            assert client.server_info is not None and client.server_info.name == marker
            assert _text(await _call(client, "add", {"a": 2, "b": 2})) == "4"
            assert _text(await _call(client, "count", {"key": "stdio"})) == "1"
            server_pid = int(_text(await _call(client, "pid")))
            assert server_pid in procs.descendants(os.getpid())
            assert procs.pids_with_cmdline_containing(marker) == [server_pid]
            return server_pid

    server_pid = asyncio.run(scenario())
    procs.wait_until(
        lambda: not procs.pids_with_cmdline_containing(marker),
        timeout=10,
        message=f"stdio server {server_pid} outlived its client",
    )
    assert procs.read_count(tmp_path, "stdio") == 1


@pytest.mark.timeout(60)
def test_only_echo_variant() -> None:
    with procs.start_test_server("http", extra_args=("--only-echo",)) as server:

        async def scenario() -> None:
            async with Client(server.url) as client:
                assert [tool.name for tool in (await client.list_tools()).tools] == ["echo"]
                assert _text(await _call(client, "echo", {"text": "hi"})) == "hi"

        asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_hang_server_times_out_connect() -> None:
    with procs.start_hang_server() as server:

        async def scenario() -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0), Client(server.url):
                    pass

        asyncio.run(scenario())


@pytest.mark.npm
@pytest.mark.timeout(60)
def test_everything_stdio_get_sum() -> None:
    procs.require_everything()  # fails (never skips) with "run `npm ci --prefix tests/npm`"
    command, args = procs.everything_stdio_command()

    async def scenario() -> None:
        async with Client(StdioServerParameters(command=command, args=args)) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"echo", "get-sum", "get-structured-content"} <= names
            result = await _call(client, "get-sum", {"a": 2, "b": 3})
            assert not result.is_error
            assert _text(result) == "The sum of 2 and 3 is 5."

    asyncio.run(scenario())


@pytest.mark.npm
@pytest.mark.timeout(60)
def test_everything_streamable_http() -> None:
    with procs.start_everything_server() as server:

        async def scenario() -> None:
            async with Client(server.url) as client:
                echoed = await _call(client, "echo", {"message": "hi"})
                assert _text(echoed) == "Echo: hi"
                weather = await _call(client, "get-structured-content", {"location": "Chicago"})
                assert weather.structured_content == {
                    "temperature": 36,
                    "conditions": "Light rain / drizzle",
                    "humidity": 82,
                }

        asyncio.run(scenario())
