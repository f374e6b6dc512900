"""AsyncToolQueue end to end, and cancel / progress on both faces: a real
redis-server, real workers and the test server over stdio.

Waiting is always on something that happens (a result, an event, a file the
server writes), never a sleep standing in for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mcpq import (
    AsyncToolQueue,
    CallNotFoundError,
    CancelOutcome,
    InvalidArgumentsError,
    MCPError,
    ProgressUpdate,
    ToolResult,
)
from mcpq.producer.calls import Call, Progress
from mcpq.producer.events import ProgressEvent, ResultEvent, StatusEvent
from tests.support.procs import read_count, read_events, start_hang_server, start_test_server, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

T = TypeVar("T")
#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Stack:
    s: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0)})
    s.start_worker(concurrency=16)
    return s


async def until_started(key: str, count_dir: Path, n: int = 1, timeout: float = 30) -> None:
    """Wait (off the loop) until ``n`` wait_for_cancel calls of ``key`` recorded "started"."""
    await asyncio.to_thread(
        wait_until, lambda: read_events(count_dir, key).count("started") >= n, timeout, 0.02
    )


# --------------------------------------------------------------------------- calls


def test_hundreds_of_gathered_calls_are_correct_on_a_few_threads(stack: Stack) -> None:
    async def main() -> tuple[list[ToolResult], int]:
        peak = threading.active_count()
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.01)  # a sampling interval, not a synchronisation

        async with AsyncToolQueue(stack.settings) as q:
            sampler = asyncio.create_task(sample())
            results = await asyncio.gather(*(q.call("add", {"a": i, "b": 7}, wait=60) for i in range(600)))
            stop.set()
            await sampler
        return list(results), peak

    results, peak = run(main())
    assert [r.structured for r in results] == [{"result": i + 7} for i in range(600)]
    assert all(r.success and r.server_name == "local" for r in results)
    assert peak <= 8, f"{peak} threads"


def test_gathered_calls_over_streamable_http(make_stack: Callable[..., Any], count_dir: Path) -> None:
    with start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as server:
        stack: Stack = make_stack({"remote": {"url": server.url, "retry_attempts": 0}})
        stack.start_worker(concurrency=16)

        async def main() -> list[ToolResult]:
            async with AsyncToolQueue(stack.settings) as q:
                return list(
                    await asyncio.gather(*(q.call("add", {"a": i, "b": 1}, wait=60) for i in range(200)))
                )

        results = run(main())
    assert [r.structured for r in results] == [{"result": i + 1} for i in range(200)]
    assert {r.server_name for r in results} == {"remote"}


def test_call_failure_rules_match_the_sync_face(stack: Stack) -> None:
    async def main() -> list[ToolResult]:
        async with AsyncToolQueue(stack.settings) as q:
            return [
                await q.call("add", {"a": float("nan"), "b": 1}),
                await q.call("add", {"a": 1, "b": 2}, timeout=-1),
                await q.call("add", {"a": 1, "b": 2}, wait="soon"),  # type: ignore[arg-type]
                await q.call("no_such_tool", {}, wait=30),
                await q.call("local/add", {"a": "x", "b": 1}, wait=30),
                await q.call("add", {"a": 2, "b": 3}, server="local", request_id="req-async-1", wait=30),
            ]

    nan, bad_timeout, bad_wait, unknown, schema, ok = run(main())
    sync = stack.queue
    assert nan.error_code == sync.call("add", {"a": float("nan"), "b": 1}).error_code == "invalid_arguments"
    assert bad_timeout.error_code == sync.call("add", {"a": 1}, timeout=-1).error_code == "invalid_arguments"
    assert bad_wait.error_code == "invalid_arguments"
    assert unknown.error_code == sync.call("no_such_tool", {}, wait=30).error_code == "tool_not_found"
    assert schema.error_code == "invalid_arguments" and schema.server_name == "local"
    assert ok.success and ok.structured == {"result": 5} and ok.request_id == "req-async-1"


def test_no_result_within_wait_is_a_timeout_result_naming_the_task(stack: Stack) -> None:
    async def main() -> ToolResult:
        async with AsyncToolQueue(stack.settings) as q:
            return await q.call("sleep_ms", {"ms": 3000}, wait=0.3)

    result = run(main())
    assert result.error_code == "timeout" and result.details["task_id"] == result.request_id
    # The call goes on: the sync face finds it by id.
    assert stack.queue.get(str(result.request_id)).result(30).success


def test_submit_get_and_result_of_an_earlier_call(stack: Stack) -> None:
    async def main() -> tuple[ToolResult, ToolResult, str]:
        async with AsyncToolQueue(stack.settings) as q:
            handle = await q.submit("echo", {"text": "hi"})
            first = await handle.result(30)
            # A fresh handle for a finished call: its stored result, read with one GET.
            again = await q.get(handle.id, "echo").result(5)
            return first, again, handle.id

    first, again, task_id = run(main())
    assert first.text == again.text == "hi" and again.request_id == task_id


def test_idempotency_key_runs_once_and_rejects_another_call(stack: Stack, count_dir: Path) -> None:
    key = f"idem-{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[list[ToolResult], ToolResult, list[str]]:
        async with AsyncToolQueue(stack.settings) as q:
            handles = await asyncio.gather(
                *(q.submit("count", {"key": key}, idempotency_key=key) for _ in range(5))
            )
            results = await asyncio.gather(*(h.result(30) for h in handles))
            other = await q.call("count", {"key": "another"}, idempotency_key=key, wait=30)
            return list(results), other, [h.id for h in handles]

    results, other, ids = run(main())
    assert len(set(ids)) == 1, "every submit with the key names the first call"
    assert all(r.success and r.structured == {"result": 1} for r in results)
    assert read_count(count_dir, key) == 1
    assert other.error_code == "invalid_arguments" and "already used" in (other.error or "")
    # The sync face agrees: same key, same call, same answer.
    assert stack.queue.submit("count", {"key": key}, idempotency_key=key).id == ids[0]


def test_events_come_in_order_and_end_after_the_result(stack: Stack) -> None:
    async def main() -> list[Any]:
        async with AsyncToolQueue(stack.settings) as q:
            handle = await q.submit("sleep_ms", {"ms": 400})
            return [e async for e in asyncio_timeout(handle.events(), 30)]

    events = run(main())
    kinds = [e.kind for e in events]
    # The first status is where the call stands when the iteration begins: a
    # fast worker may have started it before submit returned.
    assert kinds[0] == "status" and events[0].state in ("queued", "started"), events
    statuses = [e.state for e in events if isinstance(e, StatusEvent)]
    assert statuses in (["queued", "started"], ["started"]), events  # in order, none twice
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert isinstance(events[-1], ResultEvent) and events[-1].result.success


def asyncio_timeout(it: Any, seconds: float) -> Any:
    """``it`` as an async iterator that fails (instead of hanging) after ``seconds``."""

    async def gen() -> Any:
        async with asyncio.timeout(seconds):
            async for item in it:
                yield item

    return gen()


def test_closed_queue_raises_and_pending_waits_end(stack: Stack) -> None:
    async def main() -> tuple[BaseException | None, BaseException | None, BaseException | None]:
        q = AsyncToolQueue(stack.settings)
        handle = await q.submit("sleep_ms", {"ms": 5000})
        waiting = asyncio.create_task(handle.result(60))
        await asyncio.sleep(0)  # let the wait begin
        await q.close()
        errors: list[BaseException | None] = []
        for attempt in (lambda: waiting, lambda: q.call("echo", {"text": "x"}), lambda: q.submit("echo", {})):
            try:
                async with asyncio.timeout(10):
                    await attempt()
                errors.append(None)
            except MCPError as exc:
                errors.append(exc)
        return errors[0], errors[1], errors[2]

    pending, call, submit = run(main())
    for exc in (pending, call, submit):
        assert isinstance(exc, MCPError) and "closed" in str(exc), exc


def test_unreachable_broker_is_a_connection_error_result(make_stack: Callable[..., Any]) -> None:
    silent = start_hang_server()
    try:
        url = f"redis://127.0.0.1:{silent.port}"
        stack = make_stack({}, broker_url=url, env={"MCPQ_SOCKET_TIMEOUT": "1"})

        async def main() -> tuple[ToolResult, float]:
            async with AsyncToolQueue(stack.settings) as q:
                started = time.monotonic()
                result = await q.call("echo", {"text": "x"}, wait=30)
                return result, time.monotonic() - started

        result, elapsed = run(main())
        assert result.error_code == "connection_error", result
        assert "broker" in (result.error or "") and result.details["service"] == "broker_or_backend"
        assert elapsed < 20
    finally:
        silent.stop()


# --------------------------------------------------------------------------- fan-out


def test_map_fan_out_and_as_completed_with_per_call_failures(stack: Stack) -> None:
    calls: list[Call | dict[str, Any]] = [
        Call("add", {"a": 1, "b": 2}, server="local"),
        {"tool": "local/add", "arguments": {"a": 3, "b": 4}},
        Call("add", {"a": "x", "b": 1}, server="local"),  # fails the inputSchema
        Call("no_such_tool", {}),
        Call("fail", {"message": "boom"}, server="local"),  # the tool reports an error
        {"tool": "add", "arguments": [1, 2]},  # malformed: never published
    ]
    seen: list[Progress] = []

    async def main() -> tuple[list[ToolResult], list[ToolResult], list[int], list[ToolResult]]:
        async with AsyncToolQueue(stack.settings) as q:
            mapped = await q.map(
                "add", [{"a": i, "b": 1} for i in range(120)], timeout=30, chunk_size=10, window=40,
                on_progress=seen.append,
            )  # fmt: skip
            fanned = await q.fan_out(calls)
            order = [i async for i, _ in q.as_completed(calls, chunk_size=1)]
            sync = stack.queue.fan_out(calls)
            return mapped, fanned, order, sync

    mapped, fanned, order, sync = run(main())
    assert [r.structured for r in mapped] == [{"result": i + 1} for i in range(120)]
    assert [p.done for p in seen] == list(range(1, 121)) and max(p.in_flight for p in seen) <= 40
    codes = [r.error_code for r in fanned]
    assert codes == [None, None, "invalid_arguments", "tool_not_found", "tool_error", "invalid_arguments"]
    assert codes == [r.error_code for r in sync], "the same results as the sync face"
    assert sorted(order) == list(range(len(calls)))


# --------------------------------------------------------------------------- cancel


def test_cancel_malformed_unknown_and_finished(stack: Stack) -> None:
    async def main() -> tuple[list[BaseException], CancelOutcome, float]:
        async with AsyncToolQueue(stack.settings) as q:
            errors: list[BaseException] = []
            for bad in ("", "no spaces allowed", "x" * 300):
                try:
                    await q.cancel(bad)
                except InvalidArgumentsError as exc:
                    errors.append(exc)
            started = time.monotonic()
            try:
                await q.cancel(str(uuid.uuid4()))
            except CallNotFoundError as exc:
                errors.append(exc)
            not_found_took = time.monotonic() - started
            try:
                await asyncio_timeout(q.get(str(uuid.uuid4())).events(), 10).__anext__()
            except CallNotFoundError as exc:
                errors.append(exc)
            handle = await q.submit("echo", {"text": "done"})
            await handle.result(30)
            return errors, await handle.cancel(), not_found_took

    errors, finished, took = run(main())
    assert [type(e).__name__ for e in errors] == ["InvalidArgumentsError"] * 3 + ["CallNotFoundError"] * 2
    assert took < 3
    assert finished.state == "finished" and finished.result is not None and finished.result.text == "done"
    # The sync face: the same three answers.
    with pytest.raises(InvalidArgumentsError):
        stack.queue.cancel("bad id")
    with pytest.raises(CallNotFoundError):
        stack.queue.cancel(str(uuid.uuid4()))
    handle = stack.queue.submit("echo", {"text": "sync"})
    assert handle.result(30).success
    outcome = handle.cancel()
    assert outcome.state == "finished" and outcome.result is not None and outcome.result.text == "sync"
    assert stack.queue.get(handle.id).result(5).success, "cancelling a finished call changes nothing"


def test_cancel_running_and_queued_calls(stack: Stack, count_dir: Path) -> None:
    one = f"{stack.settings.queue}-one"
    stack.start_worker(concurrency=1, queue=one)
    held, queued_key = f"held-{uuid.uuid4().hex[:6]}", f"queued-{uuid.uuid4().hex[:6]}"

    async def main() -> tuple[CancelOutcome, CancelOutcome, ToolResult, ToolResult, ToolResult]:
        async with AsyncToolQueue(stack.settings) as q:
            running = await q.submit("wait_for_cancel", {"key": held, "ms": HOLD_MS}, queue=one, timeout=120)
            await until_started(held, count_dir)
            # The only slot of that worker is busy: this one waits in the queue.
            queued = await q.submit("count", {"key": queued_key}, queue=one)
            asked_queued = await queued.cancel()
            asked_running = await q.cancel(running.id)
            cancelled_running = await running.result(30)
            cancelled_queued = await queued.result(30)
            after = await q.call("echo", {"text": "slot free"}, queue=one, wait=30)
            return asked_queued, asked_running, cancelled_running, cancelled_queued, after

    asked_queued, asked_running, running, queued, after = run(main())
    assert asked_queued.state == asked_running.state == "requested" and asked_running.result is None
    assert running.error_code == "cancelled" and running.details["may_have_run"] is True
    assert queued.error_code == "cancelled" and queued.details["may_have_run"] is False
    assert after.success
    assert read_count(count_dir, queued_key) == 0, "the queued call never ran"
    assert "cancelled" in read_events(count_dir, held), "the server saw the cancellation"


def test_sync_fan_out_handle_cancel_stops_publishing(stack: Stack, count_dir: Path) -> None:
    key = f"fan-{uuid.uuid4().hex[:6]}"
    calls = [Call("wait_for_cancel", {"key": key, "ms": HOLD_MS}, server="local", timeout=120)] * 6
    handle = stack.queue.submit_many(calls, chunk_size=1, window=2)
    # Publishing the rest waits for room in the window; two calls run now.
    wait_until(lambda: read_events(count_dir, key).count("started") >= 2, 30, 0.02)
    assert handle.cancel() == 6
    results = handle.results(timeout=60)
    assert [r.error_code for r in results] == ["cancelled"] * 6
    unsent = [r for r in results if r.details.get("sent") is False]
    assert len(unsent) == 4 and all(r.details["may_have_run"] is False for r in unsent)
    assert read_events(count_dir, key).count("started") == 2


# --------------------------------------------------------------------------- progress


def test_progress_events_handle_progress_and_fan_out_callbacks(stack: Stack, count_dir: Path) -> None:
    async def main() -> tuple[list[Any], ProgressUpdate | None, ProgressUpdate | None, list[tuple[int, Any]]]:
        async with AsyncToolQueue(stack.settings) as q:
            quiet = await q.submit("progress", {"key": "quiet", "steps": 3, "ms": 10})
            handle = await q.submit("progress", {"key": "p", "steps": 5, "ms": 150}, progress=True)
            events = [e async for e in asyncio_timeout(handle.events(), 30)]
            quiet_events = [e async for e in asyncio_timeout(quiet.events(), 30)]
            assert not any(isinstance(e, ProgressEvent) for e in quiet_events), "no progress unless asked"
            seen: list[tuple[int, Any]] = []
            await q.fan_out(
                [Call("progress", {"key": f"f{i}", "steps": 4, "ms": 150}) for i in range(3)],
                chunk_size=1,
                on_call_progress=lambda i, u: seen.append((i, u)),
            )
            return events, handle.progress, quiet.progress, seen

    events, latest, quiet_latest, seen = run(main())
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress, events
    values = [e.progress for e in progress]
    assert values == sorted(values) and values[-1] == 5 and progress[-1].total == 5
    assert progress[-1].message == "step 5 of 5"
    assert events.index(progress[-1]) < len(events) - 1 and events[-1].kind == "result"
    assert latest == ProgressUpdate(5, 5, "step 5 of 5") and quiet_latest is None
    assert {i for i, _ in seen} == {0, 1, 2} and all(isinstance(u, ProgressUpdate) for _, u in seen)
    # The sync face: CallHandle.progress reads the latest from the state Redis.
    sync = stack.queue.submit("progress", {"key": "s", "steps": 3, "ms": 50}, progress=True)
    assert sync.result(30).success
    assert sync.progress == ProgressUpdate(3, 3, "step 3 of 3")
    sync_seen: list[tuple[int, ProgressUpdate]] = []
    stack.queue.fan_out(
        [Call("progress", {"key": "sf", "steps": 4, "ms": 300})],
        chunk_size=1,
        on_call_progress=lambda i, u: sync_seen.append((i, u)),
    )
    assert sync_seen and all(i == 0 for i, _ in sync_seen)


# --------------------------------------------------------------------------- submit_many


def test_async_submit_many_cancel_half_way(stack: Stack, count_dir: Path) -> None:
    one = f"{stack.settings.queue}-one"
    stack.start_worker(concurrency=1, queue=one)
    held, queued_key = f"held-{uuid.uuid4().hex[:6]}", f"queued-{uuid.uuid4().hex[:6]}"
    # Call 0 holds the worker's only slot; 1-3 wait behind it; 4-11 wait for room in the window.
    calls = [Call("wait_for_cancel", {"key": held, "ms": HOLD_MS}, server="local", timeout=120)]
    calls += [Call("count", {"key": queued_key}, server="local") for _ in range(11)]

    async def main() -> tuple[Any, ...]:
        async with AsyncToolQueue(stack.settings) as q:
            handle = await q.submit_many(calls, chunk_size=1, window=4, queue=one)
            published = handle.progress.submitted
            await until_started(held, count_dir)
            # A wait cut short loses nothing: the batch is read again below.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await handle.results()
            assert not handle.done()
            reached = await handle.cancel()
            async with asyncio.timeout(60):
                order = [i async for i, _ in handle.as_completed()]
                results = await handle.results()
            again = await handle.cancel()
            return handle.ids, published, reached, order, results, again, handle.done(), handle.progress

    ids, published, reached, order, results, again, done, progress = run(main())
    assert published == 4
    assert reached == 12, "4 published calls asked to cancel, 8 ended unsent"
    assert sorted(order) == list(range(12)), "every call exactly one result"
    assert len(results) == 12 and [r.error_code for r in results] == ["cancelled"] * 12
    running, queued, unsent = results[0], results[1:4], results[4:]
    assert running.details["may_have_run"] is True
    assert all(r.details["may_have_run"] is False and r.details.get("sent") is not False for r in queued)
    assert read_count(count_dir, queued_key) == 0, "the queued calls never ran"
    assert all(r.details["sent"] is False and r.details["may_have_run"] is False for r in unsent)
    assert [r.request_id for r in unsent] == ids[4:], "unsent calls keep the ids given up front"
    assert "cancelled" in read_events(count_dir, held), "the server saw the cancellation"
    assert again == 0, "cancelling a finished batch reaches nothing"
    assert done and (progress.done, progress.failed, progress.submitted, progress.total) == (12, 12, 12, 12)


def test_async_submit_many_gives_the_results_of_fan_out(stack: Stack, count_dir: Path) -> None:
    key = f"many-{uuid.uuid4().hex[:6]}"
    calls: list[Call | dict[str, Any]] = [Call("add", {"a": i, "b": 1}, server="local") for i in range(30)]
    calls += [
        Call("add", {"a": "x", "b": 1}, server="local"),  # fails the inputSchema
        Call("no_such_tool", {}),
        {"tool": "add", "arguments": [1, 2]},  # malformed: never published
        Call("count", {"key": key}, server="local"),
    ]

    async def main() -> tuple[Any, ...]:
        async with AsyncToolQueue(stack.settings) as q, asyncio.timeout(120):
            fanned = await q.fan_out(calls)
            handle = await q.submit_many(calls)
            published = handle.progress.submitted  # window 0: every call before it returns
            results = await handle.results()
            windowed = await q.submit_many(calls, window=5, chunk_size=1)
            first_round = windowed.progress.submitted
            order = [i async for i, _ in windowed.as_completed()]
            again = await windowed.results()
            return fanned, handle.ids, published, results, first_round, order, again, windowed.done()

    fanned, ids, published, results, first_round, order, again, done = run(main())

    def shape(rs: list[ToolResult]) -> list[tuple[bool, str | None, Any]]:
        return [(r.success, r.error_code, r.structured) for r in rs]

    assert [r.structured for r in fanned[:30]] == [{"result": i + 1} for i in range(30)]
    assert shape(results[:-1]) == shape(again[:-1]) == shape(fanned[:-1])
    # count says how often it ran so far: once per batch.
    assert sorted(rs[-1].structured["result"] for rs in (fanned, results, again)) == [1, 2, 3]
    assert [r.error_code for r in fanned[30:]] == [
        "invalid_arguments", "tool_not_found", "invalid_arguments", None
    ]  # fmt: skip
    assert published == len(calls) and first_round == 5
    assert [r.request_id for r in results[:30]] == ids[:30], "each call under the id given up front"
    assert sorted(order) == list(range(len(calls))) and done
    assert read_count(count_dir, key) == 3, "once per batch"
