"""Chunk tasks (``mcpq.call_chunk``) through real workers: packing calls must
not change any one call's semantics (claims, breaker, limits, retries, order)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from mcpq.producer.calls import Call
from mcpq.producer.fanout import FanOutHandle
from mcpq.worker.contract.task_names import CALL_CHUNK, MAX_CHUNK_CALLS
from tests.support.procs import read_count
from tests.support.stack import TINY_BUDGETS, Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def read_peak(count_dir: Path, key: str) -> int:
    return int((count_dir / f"{key}.conc").read_text().split()[1])


def send_chunk(stack: Stack, calls: list[dict[str, Any]], chunk_id: str | None = None) -> str:
    """Publish one chunk message by hand, as the producer (or a redelivery) would."""
    chunk_id = chunk_id or str(uuid.uuid4())
    stack.queue.app.send_task(
        CALL_CHUNK,
        kwargs={"calls": calls},
        task_id=chunk_id,
        queue=stack.settings.queue,
        ignore_result=True,
    )
    return chunk_id


def test_chunked_map_keeps_order_and_runs_a_chunks_calls_at_once(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    # One Celery slot: any concurrency seen by the server comes from inside a chunk.
    stack.start_worker(concurrency=1)
    handle: FanOutHandle = stack.queue.submit_many(
        [Call("add", {"a": i, "b": 7}, timeout=30) for i in range(300)], chunk_size=7
    )
    assert len(handle.chunk_ids) == math.ceil(300 / 7) and handle.group_ids == []
    results = handle.results(timeout=120)
    assert [r.structured for r in results] == [{"result": i + 7} for i in range(300)]
    assert [r.request_id for r in results] == handle.ids  # each call answers under its own id

    slow = stack.queue.map("concurrency", [{"key": "chunk", "ms": 200}] * 20, timeout=30, chunk_size=20)
    assert all(r.success for r in slow), [r.error for r in slow if not r.success]
    assert read_peak(count_dir, "chunk") >= 10, "a chunk's calls ran one after another"
    # Every chunk cleared its ledger entry when it ended.
    assert stack.state().zcard(f"{stack.settings.key_prefix}ledger") == 0


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_each_call_of_a_chunk_keeps_its_own_outcome(
    make_stack: Callable[..., Any], count_dir: Path, chunk_size: int
) -> None:
    stack = make_stack({"local": stdio_server(count_dir), "other": stdio_server(count_dir)})
    stack.start_worker()
    calls = [
        Call("add", {"a": 1, "b": 2}, server="local"),
        Call("other/add", {"a": 3, "b": 4}),
        Call("add", {"a": "x", "b": 1}, server="local"),
        Call("no_such_tool", {}, server="local"),
        Call("fail", {"message": "boom"}, server="other"),
        Call("add", {"a": 1, "b": 1}),  # bare name offered by two servers
        Call("echo", {"text": "last"}, server="other"),
    ]
    results = stack.queue.fan_out(calls, chunk_size=chunk_size)
    codes = [r.error_code for r in results]
    assert codes == [None, None, "invalid_arguments", "tool_not_found", "tool_error", "ambiguous_tool", None]
    assert results[0].structured == {"result": 3} and results[1].structured == {"result": 7}
    assert "candidates" in (results[5].error or "") or "'local/add'" in (results[5].error or "")
    assert results[6].content[0]["text"] == "last"


def test_a_retried_call_leaves_its_chunk_and_counts_its_attempts(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack(
        # 10 failures at once would open a default breaker: not what is under test here.
        {
            "local": stdio_server(
                count_dir, idempotent=True, retry_attempts=2, retry_delay=0.05, circuit_breaker_threshold=100
            )
        }
    )
    stack.start_worker()
    results = stack.queue.map(
        "flaky", [{"key": f"f{i}", "failures": 1} for i in range(10)], timeout=30, chunk_size=10
    )
    assert [r.error_code for r in results] == [None] * 10
    assert [r.attempts for r in results] == [2] * 10
    assert [read_count(count_dir, f"f{i}") for i in range(10)] == [2] * 10


def test_a_chunk_respects_the_fleet_concurrency_limit(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir, max_concurrency=2)})
    stack.start_worker()
    results = stack.queue.map("concurrency", [{"key": "lim", "ms": 100}] * 12, timeout=60, chunk_size=12)
    assert [r.error_code for r in results] == [None] * 12
    assert read_peak(count_dir, "lim") == 2


def test_breaker_counts_each_call_of_a_chunk(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack(
        {"local": stdio_server(count_dir, circuit_breaker_threshold=3, circuit_breaker_timeout=60)}
    )
    # One call at a time inside the chunk, so the order of failures is fixed.
    stack.start_worker(MCPQ_CHUNK_CONCURRENCY="1")
    results = stack.queue.map("flaky", [{"key": "b", "failures": 100}] * 8, timeout=30, chunk_size=8)
    codes = [r.error_code for r in results]
    assert codes[:3] == [codes[0]] * 3 and codes[0] not in (None, "circuit_open"), codes
    assert codes[3:] == ["circuit_open"] * 5
    assert read_count(count_dir, "b") == 3  # nothing was sent once the circuit opened
    assert stack.queue.breakers()["local"]["state"] == "open"


def test_a_redelivered_chunk_runs_only_the_calls_that_never_finished(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    ids = [str(uuid.uuid4()) for _ in range(4)]
    calls = [
        {"id": ids[i], "tool": "count", "arguments": {"key": f"r{i}"}, "server": "local"} for i in range(4)
    ]
    chunk_id = send_chunk(stack, calls[:2])
    first = FanOutHandle.attach(stack.queue, ids[:2]).results(timeout=60)
    assert [r.structured for r in first] == [{"result": 1}, {"result": 1}]
    backend = redis.Redis.from_url(stack.settings.result_backend)
    for call_id in ids[:2]:
        backend.delete(f"celery-task-meta-{call_id}")  # so the answers below are the second delivery's
    # The same chunk again, now holding two calls its first delivery never ran.
    send_chunk(stack, calls, chunk_id)
    again = FanOutHandle.attach(stack.queue, ids).results(timeout=60)
    assert [r.structured for r in again] == [{"result": 1}] * 4
    assert [bool(r.details.get("redelivered")) for r in again] == [True, True, False, False]
    assert [read_count(count_dir, f"r{i}") for i in range(4)] == [1, 1, 1, 1]


def test_a_malformed_call_in_a_chunk_fails_alone(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    send_chunk(
        stack,
        [
            {"id": ids[0], "tool": "add", "arguments": {"a": 1, "b": 1}, "server": "local"},
            {"id": ids[1], "tool": "add", "arguments": [1, 1], "server": "local"},
            {"id": ids[2], "tool": "add", "arguments": {"a": 2, "b": 2}, "command": "rm -rf /"},
        ],
    )
    results = FanOutHandle.attach(stack.queue, ids).results(timeout=60)
    assert results[0].structured == {"result": 2}
    assert results[1].error_code == "invalid_arguments"
    assert results[2].error_code == "internal_error" and "unknown fields ['command']" in (
        results[2].error or ""
    )


def test_an_oversized_chunk_fails_each_of_its_calls(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    ids = [str(uuid.uuid4()) for _ in range(MAX_CHUNK_CALLS + 1)]
    send_chunk(stack, [{"id": i, "tool": "count", "arguments": {"key": "big"}} for i in ids])
    results = FanOutHandle.attach(stack.queue, ids).results(timeout=60)
    assert {r.error_code for r in results} == {"internal_error"}
    assert f"more than {MAX_CHUNK_CALLS}" in (results[0].error or "")
    assert read_count(count_dir, "big") == 0  # nothing ran


def test_a_chunk_the_broker_lost_is_published_again(
    make_stack: Callable[..., Any], count_dir: Path, redis_url: str
) -> None:
    # Budgets small enough for the ledger to republish within the test (its
    # grace: 2 x visibility + hard limit + restore interval, 29.5 s), with room
    # for a stdio server that starts slowly on a loaded machine (a 2 s connect
    # budget once failed every call of the chunk).
    budgets = {
        **TINY_BUDGETS,
        "MCPQ_SOFT_TIME_LIMIT": "8",
        "MCPQ_TIME_LIMIT": "9",
        "MCPQ_VISIBILITY_TIMEOUT": "10",
    }
    stack = make_stack({"local": stdio_server(count_dir, timeout=1, connect_timeout=6)}, env=budgets)
    handle = stack.queue.submit_many([Call("count", {"key": f"l{i}"}) for i in range(6)], chunk_size=6)
    assert len(handle.chunk_ids) == 1
    broker = redis.Redis.from_url(f"{redis_url}/0")
    assert broker.delete(stack.settings.queue) == 1  # as a worker killed right after BRPOP would
    stack.start_worker()
    results = handle.results(timeout=90)
    assert [r.structured for r in results] == [{"result": 1}] * 6
    assert "was enqueued but never finished; publishing it again" in stack.workers[0].log_tail(200_000)
    assert stack.state().zcard(f"{stack.settings.key_prefix}ledger") == 0
