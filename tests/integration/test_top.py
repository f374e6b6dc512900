"""``mcpq top --once --json`` against a real fleet: a private redis-server, a real
Celery worker that serves ``/metrics`` and announces it in Redis, the test MCP
server over stdio and servers nobody listens on. Calls succeed and fail while
``mcpq top`` (a subprocess, the stack's environment) takes its two scrapes.
Without a metrics port the servers and breakers are still listed, with a hint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import REPO_ROOT, free_port, wait_for_port, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def servers(count_dir: Path) -> dict[str, dict[str, Any]]:
    def nobody(**fields: Any) -> dict[str, Any]:
        url = f"http://127.0.0.1:{free_port()}/mcp"
        return {"url": url, "retry_attempts": 0, "connect_timeout": 3, "timeout": 5, **fields}

    return {
        "local": stdio_server(count_dir),
        # Opens at its first failure and stays open for the test.
        "down": nobody(circuit_breaker_threshold=1, circuit_breaker_timeout=600),
        # Fails every call (refused at once) and never opens: errors in the window.
        "flaky": nobody(circuit_breaker_threshold=100_000),
    }


def top(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", "top", *args],
        env={**stack.env, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def by_server(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["server"]: row for row in snapshot["servers"]}


def test_top_once_json_with_metrics(make_stack: Callable[..., Any], count_dir: Path) -> None:
    port = free_port()
    stack: Stack = make_stack(servers(count_dir))
    worker = stack.start_worker(MCPQ_METRICS_PORT=str(port), MCPQ_METRICS_HOST="127.0.0.1")
    wait_for_port(port, 30, describe=worker.log_tail)
    url = f"http://127.0.0.1:{port}/metrics"
    state = stack.state()
    key = stack.queue.keys.metrics_endpoints
    wait_until(lambda: url in state.hgetall(key), 30, interval=0.1, message=lambda: str(state.hgetall(key)))

    q = stack.queue
    assert q.call("down/anything", {}, timeout=10).error_code == "connection_error"
    assert q.call("down/anything", {}, timeout=10).error_code == "circuit_open"
    # Calls all through top's two scrapes: ok and tool_error on local, connection_error on flaky.
    stop = threading.Event()
    counts = {"ok": 0, "tool_error": 0, "connection_error": 0}

    def load() -> None:
        while not stop.is_set():
            if q.call("local/echo", {"text": "x"}, timeout=30).success:
                counts["ok"] += 1
            if q.call("local/fail", {"message": "no"}, timeout=30).error_code == "tool_error":
                counts["tool_error"] += 1
            if q.call("flaky/anything", {}, timeout=30).error_code == "connection_error":
                counts["connection_error"] += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_until(lambda: counts["connection_error"] >= 2, 60, interval=0.05)
        proc = top(stack, "--once", "--json", "--interval", "1.5")
    finally:
        stop.set()
        thread.join(60)
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)
    assert snapshot["endpoints"] == {"announced": 1, "scraped": 1, "unreachable": [], "stale": 0}
    assert snapshot["hint"] is None
    assert snapshot["window_seconds"] >= 1.5
    rows = by_server(snapshot)
    assert set(rows) == {"local", "down", "flaky"}

    local, down, flaky = rows["local"], rows["down"], rows["flaky"]
    assert local["breaker"] == "closed" and flaky["breaker"] == "closed" and down["breaker"] == "open"
    assert local["calls_per_s"] > 0 and flaky["calls_per_s"] > 0
    assert local["error_pct"] == 0.0  # tool_error is the tool's answer, not the server failing
    assert flaky["error_pct"] == 100.0
    assert local["p50_ms"] > 0 and local["p95_ms"] >= local["p50_ms"]
    assert local["sessions"] >= 1 and 0 <= local["in_flight"] <= 1  # one call at a time runs
    # Totals since the worker started: the calls made so far (the load ran on after the scrape).
    assert 1 <= local["outcomes_total"]["ok"] <= counts["ok"]
    assert local["outcomes_total"]["tool_error"] >= 1
    assert down["outcomes_total"] == {"connection_error": 1.0, "circuit_open": 1.0}
    assert down["calls_per_s"] == 0.0 and down["error_pct"] is None  # nothing in the window

    # A clean shutdown takes the announcement away.
    worker.stop()
    assert url not in state.hgetall(key)


def test_top_without_metrics_lists_servers_and_breakers(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack: Stack = make_stack(servers(count_dir))
    stack.start_worker()
    assert stack.queue.call("down/anything", {}, timeout=10).error_code == "connection_error"
    proc = top(stack, "--once", "--json")
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)
    assert "MCPQ_METRICS_PORT" in snapshot["hint"]
    assert snapshot["endpoints"]["announced"] == 0
    rows = by_server(snapshot)
    assert {name: row["breaker"] for name, row in rows.items()} == {
        "local": "closed",
        "down": "open",
        "flaky": "closed",
    }
    assert all(row["calls_per_s"] is None and row["sessions"] is None for row in rows.values())
    # The table form says the same, hint included.
    table = top(stack, "--once")
    assert table.returncode == 0, table.stderr
    assert "down" in table.stdout and "open" in table.stdout and "MCPQ_METRICS_PORT" in table.stdout


def test_top_exits_3_when_redis_is_unreachable(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack: Stack = make_stack({"local": stdio_server(count_dir)})
    proc = top(stack, "--once", "--json", MCPQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/2")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "MCPQ_REDIS_URL" in proc.stderr or "Redis" in proc.stderr
