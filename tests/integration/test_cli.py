"""The `mcpq` command against a real worker: what users type in a shell."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_port, stdio_command_for_test_server, wait_until
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def mcpq(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Stack:
    command, args = stdio_command_for_test_server()
    s: Stack = make_stack(
        {
            "local": {"command": command, "args": args, "env": {"MCPQ_TEST_COUNT_DIR": str(count_dir)}},
            "down": {
                "url": f"http://127.0.0.1:{free_port()}/mcp",
                "circuit_breaker_threshold": 1,
                "retry_attempts": 0,
                "description": "nobody listens here",
            },
        }
    )
    s.start_worker()
    return s


def test_call_prints_json_and_exit_codes_follow_the_outcome(stack: Stack) -> None:
    ok = mcpq(stack, "call", "add", '{"a": 2, "b": 40}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["data"]["structuredContent"] == {"result": 42}
    kv = mcpq(stack, "call", "local/add", "a=1", "b=2")
    assert kv.returncode == 0 and json.loads(kv.stdout)["data"]["structuredContent"] == {"result": 3}
    bad = mcpq(stack, "call", "add", "a=x", "b=2")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error_code"] == "invalid_arguments"
    usage = mcpq(stack, "call", "add", "{not json")
    assert usage.returncode == 2 and "not valid JSON" in usage.stderr


def test_servers_tools_and_breakers(stack: Stack) -> None:
    assert stack.queue.discover()["ok"]
    servers = mcpq(stack, "servers")
    assert servers.returncode == 0
    assert "local" in servers.stdout and "nobody listens here" in servers.stdout
    listed = json.loads(mcpq(stack, "servers", "--json").stdout)
    assert {s["name"] for s in listed} == {"local", "down"}

    tools = mcpq(stack, "tools", "local", "--json")
    names = {t["name"] for t in json.loads(tools.stdout)}
    assert {"add", "math.mul", "count"} <= names
    table = mcpq(stack, "tools")
    assert "math.mul" in table.stdout and table.returncode == 0

    failed = mcpq(stack, "call", "down/anything")
    assert json.loads(failed.stdout)["error_code"] == "connection_error"
    status = json.loads(mcpq(stack, "breakers", "--json").stdout)
    assert status["down"]["state"] == "open" and status["local"]["state"] == "closed"
    shown = mcpq(stack, "breakers")
    assert shown.returncode == 0 and "open" in shown.stdout and "connection_error" in shown.stdout
    assert json.loads(mcpq(stack, "call", "down/anything").stdout)["error_code"] == "circuit_open"

    reset = mcpq(stack, "breakers", "reset", "down")
    assert reset.returncode == 0 and "reset to closed" in reset.stdout
    assert json.loads(mcpq(stack, "breakers", "--json").stdout)["down"]["state"] == "closed"
    unknown = mcpq(stack, "breakers", "reset", "nope")
    assert unknown.returncode == 1 and "no server named 'nope'" in unknown.stderr


def test_health_and_fleet_wide_reconnect(make_stack: Callable[..., Any], count_dir: Path) -> None:
    command, args = stdio_command_for_test_server()
    stack: Stack = make_stack(
        {
            "local": {"command": command, "args": args, "env": {"MCPQ_TEST_COUNT_DIR": str(count_dir)}},
            "down": {"url": f"http://127.0.0.1:{free_port()}/mcp", "connect_timeout": 2},
        }
    )
    stack.start_worker(queue="qa")
    stack.start_worker(queue="qb")

    report = mcpq(stack, "health", "--json")
    assert report.returncode == 1  # one server is down
    health = json.loads(report.stdout)
    assert health["local"]["healthy"] is True and health["local"]["latency_ms"] > 0
    assert health["local"]["protocol_version"]
    assert health["down"]["healthy"] is False and health["down"]["error_code"] == "connection_error"
    table = mcpq(stack, "health")
    assert "local" in table.stdout and "NO" in table.stdout

    def pids() -> dict[str, int]:
        return {
            q: stack.queue.call("local/pid", {}, queue=q, timeout=30).structured["result"]
            for q in ("qa", "qb")
        }

    before = pids()
    assert before["qa"] != before["qb"]  # one stdio server per worker process
    out = mcpq(stack, "reconnect", "local")
    assert out.returncode == 0 and "reconnect" in out.stdout
    # Every worker notices the fleet-wide epoch within about a second and reopens its session.
    after = wait_until(
        lambda: (p := pids())["qa"] != before["qa"] and p["qb"] != before["qb"] and p,
        20,
        interval=0.2,
        message="not every worker reconnected",
    )
    assert set(after.values()).isdisjoint(before.values())
    assert mcpq(stack, "reconnect", "nope").returncode == 1
