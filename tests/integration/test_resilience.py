"""Fleet-wide resilience with real processes: breakers shared by two workers,
retries by re-enqueueing, limits enforced in Redis, a state Redis that dies."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpq.producer.embedded_redis import EmbeddedRedis
from tests.support.procs import free_port, read_concurrency, read_count, start_test_server, wait_until
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def http_entry(url: str, **fields: Any) -> dict[str, Any]:
    return {"transport": "http", "url": url, "protocol": "legacy", **fields}


def breaker(stack: Stack, server: str) -> dict[str, Any]:
    return stack.queue.breakers()[server]


def test_breaker_is_shared_by_two_workers_and_probes_once(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    server = start_test_server("http", env=env)
    stack = make_stack(
        {
            "remote": http_entry(
                server.url,
                circuit_breaker_threshold=3,
                circuit_breaker_timeout=6,
                retry_attempts=0,
                timeout=10,
            )
        }
    )
    stack.start_worker(queue="qa")
    stack.start_worker(queue="qb")
    try:
        for q in ("qa", "qb"):  # both workers have discovered tools and hold a session
            assert stack.queue.call("remote/count", {"key": "warm"}, queue=q, timeout=10).success
        server.stop()

        # Failures are counted across both workers, not per process.
        codes = []
        for i, q in enumerate(["qa", "qb", "qa"], start=1):
            result = stack.queue.call("remote/count", {"key": "down"}, queue=q, timeout=10)
            codes.append(result.error_code)
            assert breaker(stack, "remote")["failures"] == i
        assert codes == ["connection_error"] * 3
        status = breaker(stack, "remote")
        assert status["state"] == "open" and status["last_error"] == "connection_error"

        # The server is back, but the circuit is open: both workers fail fast without touching it.
        server.start()
        for q in ("qa", "qb"):
            fast = stack.queue.call("remote/count", {"key": "while-open"}, queue=q, timeout=10)
            assert fast.error_code == "circuit_open", fast
            assert "next probe in" in fast.error
        assert read_count(count_dir, "while-open") == 0

        wait_until(lambda: breaker(stack, "remote")["state"] == "half_open", 15, interval=0.1)
        # Half-open: of many calls on both workers, exactly one probe reaches the server.
        handles = [
            stack.queue.submit("remote/slow_count", {"key": "probe", "ms": 1500}, queue=q, timeout=10)
            for q in ["qa", "qb"] * 4
        ]
        results = [h.result(60) for h in handles]
        assert sorted(r.error_code or "ok" for r in results) == ["circuit_open"] * 7 + ["ok"]
        assert read_count(count_dir, "probe") == 1

        # The probe succeeded: the breaker is closed for both workers.
        assert breaker(stack, "remote")["state"] == "closed"
        for q in ("qa", "qb"):
            assert stack.queue.call("remote/count", {"key": "after"}, queue=q, timeout=10).success
        assert read_count(count_dir, "after") == 2
    finally:
        server.stop()


def test_retry_until_success_for_idempotent_tools_only(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    with start_test_server("http", env=env) as server:
        common = {"retry_attempts": 3, "retry_delay": 0.05, "retry_max_delay": 0.2}
        stack = make_stack(
            {
                "safe": http_entry(server.url, tools={"flaky": {"idempotent": True}}, **common),
                "unsafe": http_entry(server.url, **common),
            }
        )
        stack.start_worker()
        ok = stack.queue.call("safe/flaky", {"key": "f1", "failures": 2}, timeout=10)
        assert ok.success, ok
        assert ok.attempts == 3
        assert ok.structured == {"result": 3}
        assert read_count(count_dir, "f1") == 3

        # The failure happened after the request reached the server: not retried.
        once = stack.queue.call("unsafe/flaky", {"key": "f2", "failures": 2}, timeout=10)
        assert not once.success and once.attempts == 1
        assert once.details.get("may_have_run") is True
        assert read_count(count_dir, "f2") == 1


def test_calls_that_never_reached_the_server_are_retried(make_stack: Callable[..., Any]) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    stack = make_stack({"down": http_entry(url, retry_attempts=2, retry_delay=0.05, retry_max_delay=0.1)})
    stack.start_worker()
    result = stack.queue.call("down/count", {"key": "x"}, timeout=10)
    assert result.error_code == "connection_error"
    assert result.attempts == 3


def test_max_concurrency_holds_across_two_workers(make_stack: Callable[..., Any], count_dir: Path) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    with start_test_server("http", env=env) as server:
        stack = make_stack({"remote": http_entry(server.url, max_concurrency=2, max_sessions=4)})
        stack.start_worker(concurrency=10)
        stack.start_worker(concurrency=10)
        handles = [stack.queue.submit("concurrency", {"key": "c", "ms": 200}, timeout=60) for _ in range(20)]
        results = [h.result(90) for h in handles]
        assert all(r.success for r in results), [r.error for r in results if not r.success]
        _, peak = read_concurrency(count_dir, "c")
        assert peak == 2, f"server saw {peak} calls at once"


def test_rate_limit_spaces_calls_fleet_wide(make_stack: Callable[..., Any], count_dir: Path) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    with start_test_server("http", env=env) as server:
        stack = make_stack({"remote": http_entry(server.url, rate_limit="4/s")})
        stack.start_worker()
        stack.start_worker()
        assert stack.queue.call("remote/count", {"key": "warm"}, timeout=10).success
        started = time.monotonic()
        handles = [stack.queue.submit("count", {"key": "r"}, timeout=60) for _ in range(12)]
        assert all(h.result(90).success for h in handles)
        elapsed = time.monotonic() - started
        # GCRA admits at most a burst of 4, then one per 0.25 s: 12 calls cannot finish sooner.
        assert elapsed >= (12 - 4) * 0.25 - 0.05, f"12 calls at 4/s took only {elapsed:.2f}s"
        assert read_count(count_dir, "r") == 12


def test_call_over_its_limit_until_the_deadline_fails_with_its_own_code(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    with start_test_server("http", env=env) as server:
        stack = make_stack({"remote": http_entry(server.url, max_concurrency=1)})
        stack.start_worker()
        hog = stack.queue.submit("sleep_ms", {"ms": 4000}, timeout=20)
        wait_until(lambda: breaker(stack, "remote")["in_flight"] == 1, 20, interval=0.05)
        starved = stack.queue.call("remote/count", {"key": "starved"}, timeout=1.5, wait=30)
        assert starved.error_code == "limit_exceeded", starved
        assert "max_concurrency 1" in starved.error and "deadline" in starved.error
        assert read_count(count_dir, "starved") == 0
        assert hog.result(30).success


def test_on_open_defer_waits_for_the_probe(make_stack: Callable[..., Any], count_dir: Path) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    server = start_test_server("http", env=env)
    try:
        stack = make_stack(
            {
                "remote": http_entry(
                    server.url,
                    on_open="defer",
                    circuit_breaker_threshold=1,
                    circuit_breaker_timeout=2,
                    retry_attempts=0,
                )
            }
        )
        stack.start_worker()
        assert stack.queue.call("remote/count", {"key": "warm"}, timeout=10).success
        server.stop()
        assert stack.queue.call("remote/count", {"key": "d"}, timeout=10).error_code == "connection_error"
        assert breaker(stack, "remote")["state"] == "open"
        server.start()
        deferred = stack.queue.call("remote/count", {"key": "d"}, timeout=20, wait=60)
        assert deferred.success, deferred
        assert read_count(count_dir, "d") == 1
        assert breaker(stack, "remote")["state"] == "closed"
    finally:
        server.stop()


def test_state_redis_outage_degrades_to_local_breakers_and_recovers(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    env = {"MCPQ_TEST_COUNT_DIR": str(count_dir)}
    state = EmbeddedRedis().start()
    port = state.port
    try:
        with start_test_server("http", env=env) as server:
            stack = make_stack({"remote": http_entry(server.url)}, state_url=state.url)
            worker = stack.start_worker()
            assert stack.queue.call("remote/count", {"key": "k"}, timeout=10).success
            key = f"{stack.settings.key_prefix}breaker:remote"
            assert stack.state().exists(key)

            state.stop()
            for _ in range(5):  # calls go on under the per-process breaker
                result = stack.queue.call("remote/count", {"key": "k"}, timeout=10, wait=30)
                assert result.success, result
            assert read_count(count_dir, "k") == 6

            state = EmbeddedRedis(port=port).start()  # back, empty
            assert not stack.state().exists(key)
            wait_until(
                lambda: (
                    stack.queue.call("remote/count", {"key": "k"}, timeout=10).success
                    and stack.state().exists(key)
                ),
                20,
                interval=0.2,
                message="shared breaker state did not resume after Redis came back",
            )
            log = worker.log_tail(200_000)
            assert log.count("state Redis unreachable") == 1, "the degraded warning is logged once"
            assert "reachable again" in log
    finally:
        state.stop()
