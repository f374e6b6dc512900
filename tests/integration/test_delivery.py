"""Delivery guarantees, proven by killing things: every call ends with exactly
one terminal result, and a call that may have reached its server runs again
only when it is idempotent."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.procs import (
    local_tcp_ports,
    pid_alive,
    read_count,
    start_test_server,
    wait_until,
)
from tests.support.stack import TINY_BUDGETS, Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AMQP_URL = os.environ.get("MCPQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

# Short budgets so that redelivery happens within the test:
# call deadline (5 s + 5 s connect) < soft 12 < hard 13 < visibility 15; dead after 3 s without heartbeat.
FAST = {
    "MCPQ_SOFT_TIME_LIMIT": "12",
    "MCPQ_TIME_LIMIT": "13",
    "MCPQ_VISIBILITY_TIMEOUT": "15",
    "MCPQ_RESTORE_INTERVAL": "1",
    "MCPQ_CLAIM_LEASE": "3",
}


def stdio_entry(count_dir: Path, **fields: Any) -> dict[str, Any]:
    return stdio_server(count_dir, **{"timeout": 5, "connect_timeout": 5, "retry_attempts": 0, **fields})


def _result_or_diagnose(stack: Stack, handle: Any) -> Any:
    """The handle's result; if none comes, say where the call is stuck."""
    from mcpq.worker.contract.errors import MCPTimeoutError

    try:
        return handle.result(240)
    except MCPTimeoutError:
        where = []
        if stack.settings.broker_url.startswith("redis"):
            broker = redis.Redis.from_url(stack.settings.broker_url)
            for key in broker.scan_iter():
                kind = broker.type(key)
                values = (
                    broker.lrange(key, 0, -1)
                    if kind == b"list"
                    else broker.hvals(key)
                    if kind == b"hash"
                    else []
                )
                if any(handle.id.encode() in v for v in values):
                    where.append(f"broker {key!r} ({kind!r})")
        state = stack.state()
        claims = [(k, state.hgetall(k)) for k in state.scan_iter(f"*claim:{handle.id}*")]
        raise AssertionError(
            f"call {handle.id} never ended; in broker: {where or 'nowhere'}; claims: {claims}"
        ) from None


def require_amqp() -> None:
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        raise AssertionError(
            f"RabbitMQ is needed at {AMQP_URL} (set MCPQ_TEST_AMQP_URL): {exc}; "
            "install and start rabbitmq-server (`rabbitmq-server -detached`)"
        ) from exc


def test_a_duplicate_delivery_of_a_finished_call_returns_the_stored_result(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_entry(count_dir)})
    stack.start_worker()
    first = stack.queue.submit("count", {"key": "dup"}, request_id="fixed-task-id-1")
    assert first.result(30).structured == {"result": 1}
    # The broker hands the same message (same task id) out again.
    stack.queue.submit("count", {"key": "dup"}, request_id="fixed-task-id-1")
    # Celery keeps the first SUCCESS in the backend; the worker's log shows
    # that the second delivery was answered from the claim, not the server.
    worker = stack.workers[0]
    wait_until(
        lambda: "call fixed-task-id-1 was already answered" in worker.log_tail(100_000),
        30,
        interval=0.05,
        message="the second delivery was never answered",
    )
    assert stack.queue.get("fixed-task-id-1").result(10).structured == {"result": 1}
    assert read_count(count_dir, "dup") == 1


# With Redis, kombu pops a message (BRPOP) and records it as unacknowledged in
# a second round trip: a worker SIGKILLed in between loses it (about one run
# in five before the ledger). The ledger of enqueued calls brings it back.
@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.parametrize("idempotent", [False, True])
def test_sigkill_a_worker_mid_batch(
    make_stack: Callable[..., Any], count_dir: Path, broker: str, idempotent: bool
) -> None:
    if broker == "amqp":
        require_amqp()
    n = 1000
    stack: Stack = make_stack(
        # An idempotent tool may be retried, which also rides out a call that
        # timed out on this loaded two-core machine; a non-idempotent one may not.
        # The breaker is not under test here: a few timeouts must not open it.
        {
            "local": stdio_entry(
                count_dir,
                idempotent=idempotent,
                retry_attempts=2 if idempotent else 0,
                circuit_breaker_threshold=10_000,
            )
        },
        broker_url=AMQP_URL if broker == "amqp" else None,
        env=FAST,
    )
    if broker == "amqp":
        stack.env["MCPQ_QUEUE"] = stack.settings.queue  # fresh, unique queue per test
    victim = stack.start_worker(concurrency=8)
    survivor = stack.start_worker(concurrency=8)
    handles = [stack.queue.submit("slow_count", {"key": f"k{i}", "ms": 20}) for i in range(n)]

    # Kill one worker while calls are in flight on it.
    wait_until(lambda: sum(read_count(count_dir, f"k{i}") for i in range(0, n, 10)) >= 15, 60, interval=0.05)
    victim.kill()

    results = [_result_or_diagnose(stack, h) for h in handles]
    assert survivor.proc is not None and survivor.proc.poll() is None
    # At most what the killed worker had in flight ends unknown: its 8 slots, 16 with prefetch.
    _assert_each_call_ended_once(results, count_dir, idempotent, victim.pid, max_unknown=16)


@pytest.mark.parametrize("idempotent", [False, True])
def test_sigkill_a_worker_mid_chunked_batch(
    make_stack: Callable[..., Any], count_dir: Path, idempotent: bool
) -> None:
    """The same guarantee with calls packed into chunk tasks: the killed worker's
    chunks come back, and only their unfinished calls run again (by the rules
    for a single call: a call that was running is re-run only if idempotent)."""
    from mcpq.producer.fanout import Call

    n = 1000
    stack: Stack = make_stack(
        {
            "local": stdio_entry(
                count_dir,
                idempotent=idempotent,
                retry_attempts=2 if idempotent else 0,
                circuit_breaker_threshold=10_000,
            )
        },
        env=FAST,
    )
    victim = stack.start_worker(concurrency=4)
    survivor = stack.start_worker(concurrency=4)
    handle = stack.queue.submit_many(
        [Call("slow_count", {"key": f"k{i}", "ms": 20}) for i in range(n)], chunk_size=20
    )
    assert len(handle.chunk_ids) == n // 20
    wait_until(lambda: sum(read_count(count_dir, f"k{i}") for i in range(0, n, 10)) >= 15, 60, interval=0.05)
    victim.kill()

    results = handle.results(timeout=240)
    assert survivor.proc is not None and survivor.proc.poll() is None
    # At most one chunk thread pool's worth (MCPQ_CHUNK_CONCURRENCY) was running on the victim.
    _assert_each_call_ended_once(results, count_dir, idempotent, victim.pid, max_unknown=32)


def _assert_each_call_ended_once(
    results: list[Any], count_dir: Path, idempotent: bool, victim_pid: int, max_unknown: int
) -> None:
    """After a SIGKILL mid-batch: every call has a terminal result; an idempotent
    call succeeded (re-run if need be); any other ran at most once, and ended
    unknown only if it was running on the killed worker."""
    n = len(results)
    executions = [read_count(count_dir, f"k{i}") for i in range(n)]
    codes = [r.error_code or "ok" for r in results]
    problems = {r.error for r in results if r.error_code not in (None, "outcome_unknown")}
    if idempotent:
        assert codes == ["ok"] * n, problems
        assert all(e >= 1 for e in executions)
        return
    # A deadline that passed under load is a legitimate end too.
    assert set(codes) <= {"ok", "outcome_unknown", "timeout"}, problems
    assert max(executions) <= 1, "a non-idempotent call ran twice"
    unknown = [r for r in results if r.error_code == "outcome_unknown"]
    assert len(unknown) <= max_unknown
    for r in unknown:
        assert f"pid{victim_pid}" in r.error, r.error
    assert all(e == 1 for e, c in zip(executions, codes, strict=True) if c == "ok")


def test_a_message_the_broker_lost_is_published_again(
    make_stack: Callable[..., Any], count_dir: Path, redis_url: str
) -> None:
    stack = make_stack({"local": stdio_entry(count_dir, timeout=1, connect_timeout=2)}, env=TINY_BUDGETS)
    handle = stack.queue.submit("count", {"key": "lost"})
    broker = redis.Redis.from_url(f"{redis_url}/0")
    # No worker yet: the message waits in the queue. Take it away, as a worker
    # killed between BRPOP and recording it as unacknowledged would.
    assert broker.delete(stack.settings.queue) == 1
    stack.start_worker()
    result = handle.result(60)
    assert result.success and result.structured == {"result": 1}
    assert read_count(count_dir, "lost") == 1
    assert "was enqueued but never finished; publishing it again" in stack.workers[0].log_tail(200_000)
    # The finished call left nothing in the ledger.
    assert stack.state().zcard(f"{stack.settings.key_prefix}ledger") == 0


def test_stdio_server_killed_mid_batch(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_entry(count_dir, timeout=10, circuit_breaker_timeout=1)})
    stack.start_worker(concurrency=8)
    server_pid = stack.queue.call("pid", {}, timeout=10).structured["result"]
    handles = [stack.queue.submit("slow_count", {"key": f"s{i}", "ms": 50}, timeout=10) for i in range(200)]
    wait_until(lambda: read_count(count_dir, "s20") >= 1, 30, interval=0.02)
    os.kill(server_pid, signal.SIGKILL)
    results = [h.result(60) for h in handles]
    codes = {r.error_code for r in results}
    # In-flight calls fail with the server; enough of them at once open the breaker.
    assert codes <= {None, "connection_error", "circuit_open"}, codes
    assert any(r.error_code == "connection_error" for r in results), "no call saw the dead server"
    assert all(read_count(count_dir, f"s{i}") <= 1 for i in range(200))
    wait_until(
        lambda: stack.queue.call("add", {"a": 1, "b": 2}, timeout=10).success,
        20,
        interval=0.2,
        message="calls did not recover after the stdio server was killed",
    )
    assert not pid_alive(server_pid)
    assert stack.queue.breakers()["local"]["failures"] == 0  # closed again after successes


def test_http_server_restarted_mid_batch(make_stack: Callable[..., Any], count_dir: Path) -> None:
    server = start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)})
    try:
        stack = make_stack(
            {
                "remote": {
                    "url": server.url,
                    "protocol": "legacy",
                    "timeout": 10,
                    "retry_attempts": 0,
                    "circuit_breaker_timeout": 2,
                }
            }
        )
        stack.start_worker(concurrency=8)
        handles = [
            stack.queue.submit("slow_count", {"key": f"h{i}", "ms": 50}, timeout=10) for i in range(150)
        ]
        wait_until(lambda: read_count(count_dir, "h10") >= 1, 30, interval=0.02)
        server.restart()
        results = [h.result(60) for h in handles]
        assert all(r.success or r.error_code in ("connection_error", "circuit_open") for r in results)
        assert all(read_count(count_dir, f"h{i}") <= 1 for i in range(150))
        failed = sum(not r.success for r in results)
        status = stack.queue.breakers()["remote"]
        if failed:  # the breaker saw the failures: counted, or tripped by them
            assert status["failures"] > 0 or status["trips"] > 0, status
        wait_until(
            lambda: stack.queue.call("add", {"a": 1, "b": 2}, timeout=10).success,
            20,
            interval=0.2,
            message="calls did not recover after the HTTP server restart",
        )
    finally:
        server.stop()


def test_state_redis_restarted_mid_batch(make_stack: Callable[..., Any], count_dir: Path) -> None:
    from mcpq.producer.embedded_redis import EmbeddedRedis

    state = EmbeddedRedis().start()
    port = state.port
    try:
        stack = make_stack({"local": stdio_entry(count_dir, timeout=10)}, state_url=state.url)
        stack.start_worker(concurrency=8)
        handles = [
            stack.queue.submit("slow_count", {"key": f"r{i}", "ms": 20}, timeout=10) for i in range(300)
        ]
        wait_until(lambda: read_count(count_dir, "r30") >= 1, 30, interval=0.02)
        state.stop()
        state = EmbeddedRedis(port=port).start()
        results = [h.result(60) for h in handles]
        assert all(r.success for r in results), {r.error_code for r in results}
        assert all(read_count(count_dir, f"r{i}") == 1 for i in range(300))
    finally:
        state.stop()


def test_broker_connections_cut_mid_batch(
    make_stack: Callable[..., Any], count_dir: Path, redis_url: str
) -> None:
    stack = make_stack({"local": stdio_entry(count_dir)}, env=FAST)
    worker = stack.start_worker(concurrency=8)
    handles = [stack.queue.submit("slow_count", {"key": f"b{i}", "ms": 20}, timeout=10) for i in range(300)]
    wait_until(lambda: read_count(count_dir, "b30") >= 1, 30, interval=0.02)
    # Cut every connection the worker holds to the broker's Redis (not the test's own).
    broker = redis.Redis.from_url(f"{redis_url}/0")
    ports = local_tcp_ports(worker.pid)
    cut = 0
    for client in broker.client_list():
        if int(client["addr"].rsplit(":", 1)[1]) in ports:
            cut += broker.client_kill_filter(_id=client["id"])
    assert cut > 0
    results = [h.result(90) for h in handles]
    codes = [r.error_code or "ok" for r in results]
    assert set(codes) <= {"ok", "outcome_unknown"}, [r.error for r in results if r.error]
    assert all(read_count(count_dir, f"b{i}") <= 1 for i in range(300)), "a call ran twice"


def test_result_larger_than_max_result_bytes(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_entry(count_dir)}, max_result_bytes=10_000)
    stack.start_worker()
    small = stack.queue.call("big", {"n": 1000}, timeout=10)
    assert small.success and len(small.text) == 1000
    large = stack.queue.call("big", {"n": 50_000}, timeout=10)
    assert large.error_code == "result_too_large"
    assert large.data is None and "max_result_bytes" in large.error


def test_idempotency_key_returns_the_first_result(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_entry(count_dir)})
    stack.start_worker()
    first = stack.queue.submit("count", {"key": "idem"}, idempotency_key="order-42")
    second = stack.queue.submit("count", {"key": "idem"}, idempotency_key="order-42")
    assert second.id == first.id
    assert first.result(30).structured == second.result(30).structured == {"result": 1}
    assert read_count(count_dir, "idem") == 1
    other = stack.queue.call("count", {"key": "other"}, idempotency_key="order-42", timeout=10)
    assert other.error_code == "invalid_arguments" and "different call" in other.error
    fresh = stack.queue.call("count", {"key": "idem"}, idempotency_key="order-43", timeout=10)
    assert fresh.structured == {"result": 2}


def test_time_budgets_out_of_order_refuse_to_start(make_stack: Callable[..., Any], count_dir: Path) -> None:
    import subprocess
    import sys

    stack = make_stack({"local": stdio_entry(count_dir, timeout=50)}, env={"MCPQ_SOFT_TIME_LIMIT": "30"})
    run = subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", "worker"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "MCPQ_SOFT_TIME_LIMIT" in run.stderr and "local" in run.stderr
    started = time.monotonic()
    direct = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "mcpq.worker", "worker", "-P", "threads", "-Q", "never"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert direct.returncode == 2 and time.monotonic() - started < 60
    assert "refused to start" in direct.stdout + direct.stderr
