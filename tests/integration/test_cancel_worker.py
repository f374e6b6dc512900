"""The worker side of cancellation and progress, through real workers, a real
redis-server and real MCP servers (stdio and Streamable HTTP).

Cancels are requested the way every producer does it (contract/cancel.py's
``request_cancel``: the flag plus one message); the servers' own records
(``count``, ``wait_for_cancel``'s events) say what really ran.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mcpq.worker.contract.cancel import request_cancel
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.task_names import CALL_CHUNK, CALL_TOOL
from tests.support.procs import read_count, read_events, start_test_server, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000


@pytest.fixture(params=["stdio", "http"])
def server_entry(request: pytest.FixtureRequest, count_dir: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """Makes the config of one test server over the parametrized transport."""
    if request.param == "stdio":
        yield lambda **fields: stdio_server(count_dir, **{"retry_attempts": 0, **fields})
        return
    server = start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)})
    try:
        yield lambda **fields: {"url": server.url, "retry_attempts": 0, **fields}
    finally:
        server.stop()


def cancel(stack: Stack, *call_ids: str) -> None:
    request_cancel(stack.state(), Keys(stack.settings.key_prefix), call_ids, ttl=600)


def send(stack: Stack, tool: str, arguments: dict[str, Any], **kwargs: Any) -> str:
    """Publish one ``mcpq.call_tool`` by hand (recorded in the ledger first, as the producer does)."""
    call_id = str(uuid.uuid4())
    message = {"tool": tool, "arguments": arguments, **kwargs}
    stack.queue.ledger.record([(call_id, ledger_message(message, stack.settings.queue, tool))])
    stack.queue.app.send_task(CALL_TOOL, kwargs=message, task_id=call_id, queue=stack.settings.queue)
    return call_id


def result_of(stack: Stack, call_id: str, timeout: float = 60) -> ToolResult:
    return stack.queue.get(call_id).result(timeout)


def assert_cancelled(result: ToolResult, may_have_run: bool) -> None:
    assert not result.success and result.error_code == "cancelled", (result.error_code, result.error)
    assert result.details["may_have_run"] is may_have_run, result.details


def claim_result(stack: Stack, call_id: str, attempt: int = 1) -> dict[str, Any]:
    raw = stack.state().hget(f"{stack.settings.key_prefix}claim:{call_id}:{attempt}", "result")
    assert raw is not None, "the call's claim holds no result"
    doc: dict[str, Any] = json.loads(raw)
    return doc


def ledger_is_empty(stack: Stack) -> bool:
    state = stack.state()
    keys = Keys(stack.settings.key_prefix)
    return state.zcard(keys.ledger) == 0 and state.hlen(keys.ledger_members) == 0


def test_a_queued_call_cancelled_before_it_is_delivered_never_runs(
    make_stack: Callable[..., Any], count_dir: Path, server_entry: Callable[..., dict[str, Any]]
) -> None:
    stack = make_stack({"local": server_entry()})
    handle = stack.queue.submit("count", {"key": "queued"})
    cancel(stack, handle.id)  # no worker yet: the call is still in the queue
    stack.start_worker()
    result = handle.result(60)
    assert_cancelled(result, may_have_run=False)
    assert result.server_name == "local" and result.request_id == handle.id
    assert read_count(count_dir, "queued") == 0
    # Terminal: its claim holds the result a redelivery returns, and its ledger entry is gone.
    assert claim_result(stack, handle.id)["error_code"] == "cancelled"
    assert ledger_is_empty(stack)


def test_a_running_call_is_interrupted_its_slot_freed_and_its_session_kept(
    make_stack: Callable[..., Any], count_dir: Path, server_entry: Callable[..., dict[str, Any]]
) -> None:
    stack = make_stack({"local": server_entry(timeout=90)})
    stack.start_worker(concurrency=1)  # one slot: the next call runs only once it is free
    before = stack.queue.call("pid", timeout=30)
    assert before.success, before.error

    running = stack.queue.submit("wait_for_cancel", {"key": "run", "ms": HOLD_MS}, timeout=90)
    wait_until(lambda: read_events(count_dir, "run") == ["started"], 30, message="the call never started")
    queued = stack.queue.submit("count", {"key": "behind"})  # waits for the one slot
    cancel(stack, queued.id)
    cancelled_at = time.monotonic()
    cancel(stack, running.id)

    assert_cancelled(running.result(30), may_have_run=True)
    # The server saw the SDK cancel its request (notifications/cancelled, or
    # the 2026-07-28 HTTP request's stream closed).
    wait_until(lambda: read_events(count_dir, "run") == ["started", "cancelled"], 10)
    # The slot is free at once; the call queued behind it never ran.
    assert_cancelled(queued.result(30), may_have_run=False)
    after = stack.queue.call("pid", timeout=30)
    assert time.monotonic() - cancelled_at < 5.0, "the cancelled call held its slot"
    assert after.success and after.structured == before.structured, "the session was replaced"
    assert read_count(count_dir, "behind") == 0
    # Cancellation we caused is not a failure of the server.
    assert stack.queue.breakers()["local"]["failures"] == 0
    assert claim_result(stack, running.id)["error_code"] == "cancelled"
    assert ledger_is_empty(stack)


def test_a_call_waiting_for_its_retry_is_not_tried_again(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack(
        {
            "local": stdio_server(
                count_dir, idempotent=True, retry_attempts=3, retry_delay=4, retry_max_delay=4
            )
        }
    )
    stack.start_worker()
    handle = stack.queue.submit("flaky", {"key": "retry", "failures": 10})
    # The first attempt failed (-32603, retryable for an idempotent tool) and the call
    # waits 2-4 s off-slot.
    wait_until(lambda: read_count(count_dir, "retry") == 1, 30)
    cancel(stack, handle.id)
    result = handle.result(30)
    assert_cancelled(result, may_have_run=True)  # the first attempt reached the server
    assert result.attempts == 2
    assert read_count(count_dir, "retry") == 1
    assert ledger_is_empty(stack)


def test_a_call_waiting_on_a_fleet_limit_is_never_sent(
    make_stack: Callable[..., Any], count_dir: Path, server_entry: Callable[..., dict[str, Any]]
) -> None:
    # One call at a time fleet-wide: the second waits off-slot (re-enqueued), not on a thread.
    stack = make_stack({"local": server_entry(timeout=90, max_concurrency=1)})
    stack.start_worker()
    holder = stack.queue.submit("wait_for_cancel", {"key": "hold", "ms": HOLD_MS}, timeout=90)
    wait_until(lambda: read_events(count_dir, "hold") == ["started"], 30, message="the holder never started")
    waiting = stack.queue.submit("count", {"key": "limited"}, timeout=60)
    wait_until(lambda: waiting.state == "RETRY", 30, message="the call never waited on the limit")
    cancel(stack, waiting.id)
    result = waiting.result(30)
    assert_cancelled(result, may_have_run=False)
    assert read_count(count_dir, "limited") == 0
    cancel(stack, holder.id)
    assert_cancelled(holder.result(30), may_have_run=True)
    assert ledger_is_empty(stack)


def test_chunk_calls_are_cancelled_one_by_one(
    make_stack: Callable[..., Any], count_dir: Path, server_entry: Callable[..., dict[str, Any]]
) -> None:
    stack = make_stack({"local": server_entry(timeout=90)})
    ids = [f"chunk-call-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    chunk_id = str(uuid.uuid4())
    calls = [
        {"id": ids[0], "tool": "wait_for_cancel", "arguments": {"key": "c0", "ms": HOLD_MS}, "timeout": 90},
        {"id": ids[1], "tool": "count", "arguments": {"key": "c1"}},
        {"id": ids[2], "tool": "count", "arguments": {"key": "c2"}},
    ]
    stack.queue.ledger.record(
        [(chunk_id, ledger_message({"calls": calls}, stack.settings.queue, "chunk", task=CALL_CHUNK))],
        members=[(call_id, chunk_id) for call_id in ids],
    )
    cancel(stack, ids[2])  # before the chunk is delivered
    stack.queue.app.send_task(
        CALL_CHUNK, kwargs={"calls": calls}, task_id=chunk_id, queue=stack.settings.queue, ignore_result=True
    )
    stack.start_worker(concurrency=1)
    wait_until(lambda: read_events(count_dir, "c0") == ["started"], 30, message="the chunk never started")
    cancel(stack, ids[0])  # while it runs

    assert_cancelled(result_of(stack, ids[0]), may_have_run=True)
    assert result_of(stack, ids[1]).structured == {"result": 1}
    assert_cancelled(result_of(stack, ids[2]), may_have_run=False)
    assert read_count(count_dir, "c2") == 0
    wait_until(lambda: "cancelled" in read_events(count_dir, "c0"), 10)
    # The finished chunk forgot its calls' ids too.
    wait_until(lambda: ledger_is_empty(stack), 10, message="the chunk's ledger entries were left behind")


def test_a_worker_killed_while_a_cancel_is_in_flight_runs_nothing_again(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    # Short budgets so the broker redelivers within the test: call deadline
    # (5 s + 5 s connect) < soft 12 < hard 13 < visibility 15; dead after 3 s without heartbeat.
    env = {
        "MCPQ_SOFT_TIME_LIMIT": "12",
        "MCPQ_TIME_LIMIT": "13",
        "MCPQ_VISIBILITY_TIMEOUT": "15",
        "MCPQ_RESTORE_INTERVAL": "1",
        "MCPQ_CLAIM_LEASE": "3",
    }
    stack = make_stack(
        {"local": stdio_server(count_dir, timeout=5, connect_timeout=5, retry_attempts=0)}, env=env
    )
    victim = stack.start_worker(concurrency=1)
    handle = stack.queue.submit("wait_for_cancel", {"key": "killed", "ms": 4500})
    wait_until(lambda: read_events(count_dir, "killed") == ["started"], 30)
    victim.kill()  # mid-call: its claim stays "running", its heartbeat goes stale
    cancel(stack, handle.id)  # nobody is running it to hear the message; the flag stays
    stack.start_worker()
    result = handle.result(90)
    assert_cancelled(result, may_have_run=True)  # the killed delivery may have run it
    assert f"pid{victim.pid}" in (result.error or ""), result.error
    assert read_events(count_dir, "killed") == ["started"], "the call was run again"
    assert ledger_is_empty(stack)


def test_cancelling_a_finished_call_changes_nothing(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    worker = stack.start_worker()
    call_id = f"finished-{uuid.uuid4().hex[:8]}"
    assert stack.queue.submit("count", {"key": "done"}, request_id=call_id).result(30).structured == {
        "result": 1
    }
    cancel(stack, call_id)
    # The same message delivered again (a redelivery) meets the flag, but its claim is done.
    stack.queue.submit("count", {"key": "done"}, request_id=call_id)
    wait_until(
        lambda: f"call {call_id} was already answered" in worker.log_tail(100_000),
        30,
        message="the second delivery was never answered",
    )
    again = stack.queue.get(call_id).result(10)
    assert again.success and again.structured == {"result": 1}
    assert claim_result(stack, call_id)["success"] is True
    assert read_count(count_dir, "done") == 1


class ProgressListener:
    """Collects the progress updates published for one call, from before it is sent."""

    def __init__(self, stack: Stack, pattern: str) -> None:
        self.pubsub = redis.Redis.from_url(stack.settings.redis_url).pubsub()
        self.pubsub.psubscribe(pattern)
        assert self.pubsub.get_message(timeout=5)["type"] == "psubscribe"  # type: ignore[index]
        self.updates: list[tuple[str, ProgressUpdate | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                self.updates.append((message["channel"].decode(), ProgressUpdate.from_json(message["data"])))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()


def test_progress_reaches_redis_coalesced_and_complete(
    make_stack: Callable[..., Any], count_dir: Path, server_entry: Callable[..., dict[str, Any]]
) -> None:
    stack = make_stack({"local": server_entry()})
    stack.start_worker()
    keys = Keys(stack.settings.key_prefix)
    listener = ProgressListener(stack, keys.progress("*"))
    try:
        steps = 40  # 40 notifications 15 ms apart: about six 100 ms windows
        call_id = send(stack, "progress", {"key": "prog", "steps": steps, "ms": 15}, progress=True)
        result = result_of(stack, call_id)
        assert result.success and result.structured == {"result": steps}, result.error
        # The last update is flushed before the result is returned.
        assert listener.updates, "no progress was published"
        last = listener.updates[-1][1]
        assert last == ProgressUpdate(steps, steps, f"step {steps} of {steps}")
    finally:
        listener.close()
    channels = {channel for channel, _ in listener.updates}
    assert channels == {keys.progress(call_id)}
    values = [update.progress for _, update in listener.updates if update is not None]
    assert len(values) == len(listener.updates), "a published update did not parse"
    assert values == sorted(set(values)), values  # increasing, never repeated
    assert len(values) < steps / 2, f"{len(values)} writes for {steps} notifications: not coalesced"
    stored = stack.state().get(keys.progress(call_id))
    assert stored is not None and ProgressUpdate.from_json(stored) == last
    assert 0 < stack.state().ttl(keys.progress(call_id)) <= 600


def test_a_call_without_progress_costs_no_progress_traffic(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    keys = Keys(stack.settings.key_prefix)
    listener = ProgressListener(stack, keys.progress("*"))
    try:
        call_id = send(stack, "progress", {"key": "quiet", "steps": 10, "ms": 5})
        assert result_of(stack, call_id).structured == {"result": 10}
        # Published in order on one connection: a marker sent after the result
        # arrives after anything the call could have published.
        marker = keys.progress("marker")
        stack.state().publish(marker, ProgressUpdate(1).to_json())
        wait_until(lambda: any(channel == marker for channel, _ in listener.updates), 10)
    finally:
        listener.close()
    assert [channel for channel, _ in listener.updates] == [marker]
    assert stack.state().exists(keys.progress(call_id)) == 0
    assert read_count(count_dir, "quiet") == 1
