"""What a hostile but honest caller found: no caller's input may hurt the fleet,
one bad server may not hide the others, nothing hangs unbounded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from mcpq.worker.contract.errors import InvalidArgumentsError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.task_names import CALL_TOOL
from tests.support.procs import (
    free_port,
    read_count,
    require_everything,
    start_everything_server,
    start_hang_server,
    start_test_server,
    stdio_command_for_test_server,
    wait_for_port,
)
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def stdio_entry(count_dir: Path, **fields: Any) -> dict[str, Any]:
    command, args = stdio_command_for_test_server()
    return {"command": command, "args": args, "env": {"MCPQ_TEST_COUNT_DIR": str(count_dir)}, **fields}


def cli(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "bad",
    [
        {"key": "\ud800"},  # valid JSON (an escape), not encodable as UTF-8
        {"key": "x", "extra": {"nested\udfff": 1}},
        {"key": "x", "n": float("nan")},
        {"key": "x", "n": float("inf")},
    ],
    ids=["lone-surrogate", "surrogate-key", "nan", "infinity"],
)
def test_an_argument_the_sdk_cannot_send_fails_alone_and_never_trips_the_breaker(
    make_stack: Callable[..., Any], count_dir: Path, bad: dict[str, Any]
) -> None:
    stack = make_stack({"s": stdio_entry(count_dir, circuit_breaker_threshold=1, retry_attempts=3)})
    stack.start_worker()
    assert stack.queue.call("s/count", {"key": "warm"}, timeout=20).success

    # mcpq's own producer refuses at once, before publishing ...
    with pytest.raises(InvalidArgumentsError):
        stack.queue.submit("s/count", bad, timeout=20)
    assert stack.queue.call("s/count", bad, timeout=20).error_code == "invalid_arguments"
    # ... and the worker refuses the same from any other Celery client, before sending.
    sent = stack.queue.app.send_task(CALL_TOOL, kwargs={"tool": "s/count", "arguments": bad, "timeout": 20})
    result = ToolResult.from_dict(sent.get(timeout=30))
    assert result.error_code == "invalid_arguments", result.to_dict()
    assert result.attempts == 1
    # Nothing was sent: the tool never ran, the breaker saw nothing, the next caller is served.
    assert stack.queue.breakers()["s"]["failures"] == 0
    assert stack.queue.breakers()["s"]["state"] == "closed"
    assert stack.queue.call("s/count", {"key": "after"}, timeout=20).success
    assert read_count(count_dir, "after") == 1
    assert read_count(count_dir, "x") == 0


# --------------------------------------------------------------------------- one bad server


def test_a_stdio_server_whose_command_is_missing_fails_at_once_and_health_reports_the_rest(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack(
        {
            "good": stdio_entry(count_dir),
            "missing": {"command": "no-such-mcp-server-binary", "timeout": 30},
            "relative": {"command": "./not-here.sh", "cwd": str(count_dir), "timeout": 30},
        }
    )
    stack.start_worker()
    assert stack.queue.call("good/add", {"a": 1, "b": 2}, timeout=20).success

    for server, says in (
        ("missing", "'no-such-mcp-server-binary' was not found on PATH"),
        ("relative", "cwd"),
    ):
        started = time.monotonic()
        result = stack.queue.call(f"{server}/add", {"a": 1, "b": 2}, timeout=30)
        elapsed = time.monotonic() - started
        assert result.error_code == "connection_error", result.to_dict()
        assert says in (result.error or "")
        assert result.attempts == 1  # a missing executable is not retried
        assert elapsed < 5, elapsed  # at once, not after the 30 s deadline

    health = cli(stack, "health", "--json", "--wait", "30")
    assert "Traceback" not in health.stderr, health.stderr
    report = json.loads(health.stdout)
    assert report["good"]["healthy"] is True
    assert report["missing"]["healthy"] is False
    assert "no-such-mcp-server-binary" in report["missing"]["error"]
    assert report["relative"]["healthy"] is False

    discover = cli(stack, "discover")
    assert "Traceback" not in discover.stderr, discover.stderr
    assert "good: " in discover.stdout and "missing: FAILED" in discover.stdout


# --------------------------------------------------------------------------- fleet memory


def test_a_server_moved_to_another_url_is_not_spoken_to_by_the_old_urls_memory(
    make_stack: Callable[..., Any],
) -> None:
    """Server ``s`` at URL A (speaks 2026-07-28), one call, worker stopped; ``s`` moved to
    URL B (a handshake-era server offering ``get-sum``), new worker: the call must go to B
    as B is, not by A's remembered protocol and tool list."""
    require_everything()
    modern = start_test_server("http")
    handshake_era = start_everything_server()
    try:
        stack = make_stack({"s": {"url": modern.url, "protocol": "auto", "timeout": 20}})
        first = stack.start_worker()
        assert stack.queue.call("s/add", {"a": 1, "b": 2}, timeout=20).success
        remembered = stack.state().hget(stack.queue.keys.protocols, "s")
        assert remembered is not None and "2026-07-28" in remembered  # what A taught the fleet
        first.stop()

        stack.config_path.write_text(
            yaml.safe_dump(
                {"mcp_servers": {"s": {"url": handshake_era.url, "protocol": "auto", "timeout": 20}}}
            )
        )
        stack.start_worker()
        result = stack.queue.call("get-sum", {"a": 2, "b": 3}, server="s", timeout=20)
        assert result.success, result.to_dict()
        assert "5" in (result.text or "")
        assert stack.queue.call("s/add", {"a": 1, "b": 2}, timeout=20).error_code == "tool_not_found"
    finally:
        modern.stop()
        handshake_era.stop()


# --------------------------------------------------------------------------- silent broker, clean exits


def test_a_broker_that_accepts_and_never_answers_ends_in_exit_3_not_a_hang(
    make_stack: Callable[..., Any],
) -> None:
    silent = start_hang_server()
    try:
        url = f"redis://127.0.0.1:{silent.port}"
        stack = make_stack(
            {},
            broker_url=url,
            env={"MCPQ_RESULT_BACKEND": f"{url}/1", "MCPQ_REDIS_URL": f"{url}/2", "MCPQ_SOCKET_TIMEOUT": "2"},
        )
        for argv in (
            ["call", "echo", "text=x", "--timeout", "5", "--wait", "10"],
            ["health", "--wait", "5"],
            ["servers"],
        ):
            started = time.monotonic()
            done = cli(stack, *argv, timeout=90)
            elapsed = time.monotonic() - started
            assert done.returncode == 3, (argv, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
            assert elapsed < 60, (argv, elapsed)
        assert "cannot reach the state Redis at" in done.stderr and "does not reply" in done.stderr
    finally:
        silent.stop()


def test_cli_exits_cleanly_when_no_worker_answers(make_stack: Callable[..., Any], count_dir: Path) -> None:
    """A pending result used to unsubscribe at interpreter shutdown and print
    "Exception ignored in AsyncResult.__del__" after the message."""
    stack = make_stack({"s": stdio_entry(count_dir)})  # no worker started
    stack.queue.redis.hset(stack.queue.keys.servers, "s", "{}")
    for argv in (
        ["tools", "s", "--refresh", "--wait", "1"],
        ["health", "--wait", "1"],
        ["discover", "--wait", "1"],
    ):
        done = cli(stack, *argv)
        assert done.returncode == 3, (argv, done.stderr)
        assert "no worker answered" in done.stderr
        assert "Exception ignored" not in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_the_http_api_answers_503_when_the_broker_never_answers() -> None:
    from fastapi.testclient import TestClient

    from mcpq.producer.api import create_app
    from mcpq.worker.contract.settings import Settings

    silent = start_hang_server()
    try:
        url = f"redis://127.0.0.1:{silent.port}"
        settings = Settings(
            broker_url=f"{url}/0",
            result_backend=f"{url}/1",
            redis_url=f"{url}/2",
            admin_token="hardening-admin-token",
            socket_timeout=2.0,
        )
        with TestClient(create_app(settings=settings)) as client:
            started = time.monotonic()
            health = client.get("/mcp/health", params={"wait": 5})
            called = client.post(
                "/mcp/call",
                json={"tool": "echo", "arguments": {"text": "x"}, "timeout": 5, "wait": 10},
                headers={"Authorization": "Bearer hardening-admin-token"},
            )
            elapsed = time.monotonic() - started
        assert health.status_code == 503, health.text
        assert called.status_code == 503, called.text
        assert called.json()["error_code"] == "connection_error"
        assert elapsed < 120, elapsed
    finally:
        silent.stop()


# --------------------------------------------------------------------------- open requests


def test_open_requests_waiting_for_no_worker_never_delay_an_admin_call(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    """210 unauthenticated health requests park (no worker is up); an admin call
    with ``wait`` 3 must still answer after about 3 s, not after the open ones' 20 s."""
    stack = make_stack({"s": stdio_entry(count_dir)}, env={"MCPQ_ADMIN_TOKEN": "starve-admin-token"})
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcpq.producer.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=stack.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    broker = redis.Redis.from_url(stack.settings.broker_url)
    try:
        wait_for_port(port, timeout=30, proc=proc)

        async def scenario() -> tuple[httpx.Response, float]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
            ) as client:
                parked = [
                    asyncio.create_task(client.get("/mcp/health", params={"wait": 20})) for _ in range(210)
                ]
                # The open requests are waiting once their health tasks sit in the
                # (unconsumed) queue; however many run at once, at least 16 do.
                deadline = time.monotonic() + 30
                while broker.llen(stack.settings.queue) < 16:
                    assert time.monotonic() < deadline, "the open requests never reached the broker"
                    await asyncio.sleep(0.05)
                started = time.monotonic()
                answer = await client.post(
                    "/mcp/call",
                    json={"tool": "s/count", "arguments": {"key": "k"}, "timeout": 5, "wait": 3},
                    headers={"Authorization": "Bearer starve-admin-token"},
                )
                elapsed = time.monotonic() - started
                for task in parked:
                    task.cancel()
                await asyncio.gather(*parked, return_exceptions=True)
                return answer, elapsed

        answer, elapsed = asyncio.run(scenario())
        assert answer.status_code == 504, answer.text
        assert answer.json()["error_code"] == "timeout"
        assert elapsed < 12, f"the admin call waited {elapsed:.1f}s behind open requests"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        broker.close()
