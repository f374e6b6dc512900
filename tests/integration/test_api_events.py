"""The HTTP API's call events (``GET /mcp/calls/{id}/events``, Server-Sent
Events) and cancel (``DELETE /mcp/calls/{id}``) against a real fleet: a private
redis-server, a real Celery worker, the test MCP server over stdio (and over
Streamable HTTP for cancel), the app behind a real uvicorn server in a thread,
spoken to with httpx, streams read frame by frame as an SSE client reads them.

What really ran is read from the test server's own records (``count``,
``wait_for_cancel``'s events); every wait is on an observable fact.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from mcpq.producer import api as api_module
from mcpq.producer.api import create_app
from mcpq.worker.contract.keys import Keys
from tests.support.procs import free_port, read_count, read_events, start_test_server, wait_until
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "events-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
#: Long enough that only a cancel ends a wait_for_cancel call within a test.
HOLD_MS = 60_000
#: Ids the API must refuse (422) before asking anyone: a space, a leading
#: dash, a character outside the alphabet, one character too many.
MALFORMED_IDS = ["bad id", "-leading-dash", "semi;colon", "x" * 201]


# --------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class Frame:
    """One Server-Sent Event: its ``event:`` name, its ``data:`` (parsed as JSON), its ``id:``."""

    event: str
    data: Any
    id: str | None = None


@dataclass(frozen=True)
class Comment:
    """A ``:`` line: a keep-alive, which an EventSource never shows as an event."""

    text: str


@dataclass
class SSEReader:
    """Reads a ``text/event-stream`` response the way an EventSource does:
    ``field: value`` lines, ``:`` comments, a blank line ends an event."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    def __post_init__(self) -> None:
        self._items = self._parse()

    def _parse(self) -> Iterator[Frame | Comment]:
        event: str | None = None
        data: list[str] = []
        last_id: str | None = None
        for line in self.response.iter_lines():
            if line == "":
                if data:
                    yield Frame(event or "message", json.loads("\n".join(data)), last_id)
                else:
                    assert event is None, f"event {event!r} came without data"
                event, data = None, []
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                yield Comment(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                last_id = value
            elif name != "retry":
                raise AssertionError(f"not an SSE field: {line!r}")
        assert event is None and not data, "the stream ended in the middle of an event"
        self.ended = True

    def next_item(self) -> Frame | Comment:
        """The next event or comment (AssertionError if the stream ends first)."""
        item = next(self._items, None)
        assert item is not None, "the stream ended"
        return item

    def next(self) -> Frame:
        """The next event, past any comments."""
        while True:
            item = self.next_item()
            if isinstance(item, Frame):
                return item

    def rest(self) -> list[Frame]:
        """Every event until the server ends the stream."""
        frames = [item for item in self._items if isinstance(item, Frame)]
        assert self.ended
        return frames


@contextmanager
def events_of(client: httpx.Client, task_id: str, **kwargs: Any) -> Iterator[SSEReader]:
    """GET /mcp/calls/{id}/events as a stream; it must be one (200, text/event-stream)."""
    with client.stream("GET", f"/mcp/calls/{task_id}/events", headers=ADMIN, **kwargs) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        assert response.headers["cache-control"] == "no-cache"
        yield SSEReader(response)


def kinds(frames: list[Frame]) -> list[str]:
    return [f.event for f in frames]


# --------------------------------------------------------------------------- the fleet


@dataclass
class Served:
    """The app behind a real uvicorn server, and an httpx client to it."""

    app: FastAPI
    client: httpx.Client
    url: str

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's event loop (the only thread that may touch the queue)."""
        queue = self.app.state.mcpq.queue
        assert queue._loop is not None, "the app has not used its queue yet"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), queue._loop).result(10)


@contextmanager
def served(stack: Stack) -> Iterator[Served]:
    """create_app(settings=stack.settings) behind a real uvicorn server on a free port."""
    port = free_port()
    app = create_app(settings=stack.settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-events-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 30, message="uvicorn did not start")
        assert server.started, "uvicorn exited while starting"
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=90) as client:
            yield Served(app, client, url)
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def make_fleet(make_stack: Callable[..., Any], entry: dict[str, Any]) -> Stack:
    stack: Stack = make_stack({"local": entry}, env={"MCPQ_ADMIN_TOKEN": TOKEN})
    stack.start_worker()
    return stack


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Stack:
    return make_fleet(make_stack, stdio_server(count_dir, retry_attempts=0, timeout=90))


@pytest.fixture()
def served_api(stack: Stack) -> Iterator[Served]:
    with served(stack) as s:
        yield s


@pytest.fixture()
def api(served_api: Served) -> httpx.Client:
    return served_api.client


@pytest.fixture(params=["stdio", "http"])
def transport_stack(
    request: pytest.FixtureRequest, make_stack: Callable[..., Any], count_dir: Path
) -> Iterator[Stack]:
    """The fleet with the test server over the parametrized transport."""
    if request.param == "stdio":
        yield make_fleet(make_stack, stdio_server(count_dir, retry_attempts=0, timeout=90))
        return
    server = start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)})
    try:
        yield make_fleet(make_stack, {"url": server.url, "retry_attempts": 0, "timeout": 90})
    finally:
        server.stop()


@pytest.fixture()
def held(make_stack: Callable[..., Any]) -> Iterator[list[tuple[Stack, str]]]:
    """(stack, task id) of wait_for_cancel calls a test starts: cancelled when it
    ends however it ends, so a failed test does not hold its worker's shutdown
    for a minute (torn down before make_stack's stacks)."""
    calls: list[tuple[Stack, str]] = []
    yield calls
    for stack, task_id in calls:
        with contextlib.suppress(Exception):
            stack.queue.cancel(task_id)


def enqueue(api: httpx.Client, tool: str, arguments: dict[str, Any], **extra: Any) -> str:
    """POST /mcp/calls one call; its task id."""
    answer = api.post("/mcp/calls", json={"tool": tool, "arguments": arguments, **extra}, headers=ADMIN)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["calls"][0]["task_id"]
    return task_id


def finished_call(api: httpx.Client, arguments: dict[str, Any]) -> dict[str, Any]:
    """POST /mcp/call ``add`` and wait: its (successful) ToolResult."""
    answer = api.post("/mcp/call", json={"tool": "local/add", "arguments": arguments}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    assert result["success"] and result["request_id"], result
    return result


def call_status(api: httpx.Client, task_id: str) -> dict[str, Any]:
    answer = api.get(f"/mcp/calls/{task_id}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def error_of(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body: dict[str, Any] = answer.json()
    assert body["error_code"] == code, body
    assert body["error"]
    return body


def started(count_dir: Path, key: str) -> None:
    wait_until(lambda: read_events(count_dir, key) == ["started"], 30, message=f"{key} never started")


def assert_cancelled(result: dict[str, Any], *, may_have_run: bool) -> None:
    assert result["success"] is False and result["error_code"] == "cancelled", result
    assert result["details"]["may_have_run"] is may_have_run, result["details"]
    assert result["details"]["retry_safe"] is False and result["details"]["server"] == "local"
    assert result["server_name"] == "local"


# --------------------------------------------------------------------------- events


def test_progress_call_streams_status_progress_then_its_result(api: httpx.Client, count_dir: Path) -> None:
    steps = 30  # 30 notifications 100 ms apart: the stream is open long before the last
    task_id = enqueue(api, "local/progress", {"key": "prog", "steps": steps, "ms": 100}, progress=True)
    with events_of(api, task_id) as reader:
        frames = [reader.next()]
        frames += reader.rest()

    assert frames[0].event == "status" and frames[0].data["state"] in ("queued", "started"), frames[0]
    assert kinds(frames).count("result") == 1 and frames[-1].event == "result", kinds(frames)
    assert set(kinds(frames)) == {"status", "progress", "result"}, kinds(frames)
    # A status before any progress: the call runs before it reports.
    assert kinds(frames).index("status") < kinds(frames).index("progress")
    statuses = [f.data for f in frames if f.event == "status"]
    assert all(s["state"] in ("queued", "started", "retrying") for s in statuses), statuses
    assert all(set(s) == {"state"} for s in statuses)

    progress = [f.data for f in frames if f.event == "progress"]
    assert len(progress) >= 2, progress
    values = [p["progress"] for p in progress]
    assert values == sorted(set(values)), f"progress not increasing: {values}"
    for p in progress:
        assert set(p) == {"progress", "total", "message"}, p
        assert p["total"] == steps and p["message"] == f"step {p['progress']:g} of {steps}", p
    # The last update is flushed before the result is stored: it arrives before the result.
    assert progress[-1] == {"progress": steps, "total": steps, "message": f"step {steps} of {steps}"}

    result = frames[-1].data
    assert result["success"] is True and result["data"]["structuredContent"] == {"result": steps}, result
    assert result["request_id"] == task_id and result["server_name"] == "local"
    assert result["tool_name"] == "progress"
    status = call_status(api, task_id)
    assert status["ready"] is True and status["state"] == "SUCCESS"
    assert status["result"] == result
    assert read_count(count_dir, "prog") == 1


def test_a_call_sent_without_progress_streams_no_progress(api: httpx.Client) -> None:
    task_id = enqueue(api, "local/progress", {"key": "quiet", "steps": 10, "ms": 100})
    with events_of(api, task_id) as reader:
        frames = reader.rest()
    assert kinds(frames)[-1] == "result" and "progress" not in kinds(frames), kinds(frames)
    assert set(kinds(frames[:-1])) == {"status"}
    assert frames[-1].data["data"]["structuredContent"] == {"result": 10}
    assert frames[-1].data == call_status(api, task_id)["result"]


def test_a_finished_call_streams_its_result_at_once_and_ends(api: httpx.Client) -> None:
    result = finished_call(api, {"a": 2, "b": 40})
    task_id = result["request_id"]
    began = time.monotonic()
    with events_of(api, task_id) as reader:
        frames = reader.rest()
    assert time.monotonic() - began < api_module.SSE_KEEPALIVE, "the stream waited for something"
    assert frames == [
        Frame("status", {"state": "finished"}),
        Frame("result", result),
    ], frames
    assert reader.comments == []
    assert call_status(api, task_id)["result"] == result


def test_events_errors_answer_before_any_stream(api: httpx.Client) -> None:
    unknown = str(uuid.uuid4())
    with api.stream("GET", f"/mcp/calls/{unknown}/events", headers=ADMIN) as response:
        response.read()
    body = error_of(response, 404, "call_not_found")
    assert body["details"] == {"id": unknown}
    for bad in MALFORMED_IDS:
        error_of(api.get(f"/mcp/calls/{bad}/events", headers=ADMIN), 422, "invalid_arguments")
    error_of(api.get(f"/mcp/calls/{'x' * 257}/events", headers=ADMIN), 422, "invalid_arguments")

    # Auth first: no token, or the wrong one, is 401 whatever the id.
    real = finished_call(api, {"a": 1, "b": 1})["request_id"]
    for task_id in (real, unknown, "bad id"):
        error_of(api.get(f"/mcp/calls/{task_id}/events"), 401, "unauthorized")
        wrong = {"Authorization": "Bearer not-the-token"}
        error_of(api.get(f"/mcp/calls/{task_id}/events", headers=wrong), 401, "unauthorized")


def test_a_quiet_stream_sends_keep_alives(
    stack: Stack,
    api: httpx.Client,
    count_dir: Path,
    held: list[tuple[Stack, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api_module, "SSE_KEEPALIVE", 0.2)  # read at every wait: takes effect at once
    task_id = enqueue(api, "local/wait_for_cancel", {"key": "quiet", "ms": HOLD_MS}, timeout=90)
    held.append((stack, task_id))
    started(count_dir, "quiet")
    with events_of(api, task_id) as reader:
        assert reader.next() == Frame("status", {"state": "started"})
        # Nothing happens until the cancel: only comments come meanwhile.
        assert reader.next_item() == Comment("keep-alive")
        assert reader.next_item() == Comment("keep-alive")
        cancel = api.delete(f"/mcp/calls/{task_id}", headers=ADMIN)
        assert cancel.status_code == 202, cancel.text
        frames = reader.rest()
    assert frames and frames[-1].event == "result", frames
    assert_cancelled(frames[-1].data, may_have_run=True)


def other_tasks() -> set[asyncio.Task[Any]]:
    """The event loop's unfinished tasks but the one asking (run it with Served.in_loop)."""
    return {t for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task()}


def test_a_client_that_goes_away_leaves_nothing_behind(
    stack: Stack, served_api: Served, count_dir: Path, held: list[tuple[Stack, str]]
) -> None:
    api = served_api.client
    task_id = enqueue(api, "local/wait_for_cancel", {"key": "gone", "ms": HOLD_MS}, timeout=90)
    held.append((stack, task_id))
    started(count_dir, "gone")
    before = served_api.in_loop(other_tasks)
    tracker = served_api.in_loop(lambda: served_api.app.state.mcpq.queue._tracker)
    with events_of(api, task_id) as reader:
        assert reader.next().event == "status"
        assert served_api.in_loop(lambda: len(tracker)) == 1
    # The connection is closed: the server stops following the call...
    wait_until(
        lambda: served_api.in_loop(lambda: len(tracker)) == 0, 30, message="the call is still followed"
    )
    # ...and no task is left waiting for the call's next event.
    wait_until(
        lambda: served_api.in_loop(other_tasks) <= before,
        10,
        message=lambda: f"tasks left behind: {served_api.in_loop(other_tasks) - before}",
    )
    # The call goes on, cancellable as ever.
    assert api.delete(f"/mcp/calls/{task_id}", headers=ADMIN).status_code == 202
    wait_until(lambda: read_events(count_dir, "gone") == ["started", "cancelled"], 30)


# --------------------------------------------------------------------------- cancel


def test_cancelling_a_finished_call_answers_its_result(api: httpx.Client, count_dir: Path) -> None:
    task_id = enqueue(api, "local/count", {"key": "done"})
    with events_of(api, task_id) as reader:
        result = reader.rest()[-1].data
    answer = api.delete(f"/mcp/calls/{task_id}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"task_id": task_id, "state": "finished", "result": result}
    assert result["success"] and result["data"]["structuredContent"] == {"result": 1}
    # Nothing changed: the call stays as it ended, and ran once.
    assert call_status(api, task_id)["result"] == result
    assert read_count(count_dir, "done") == 1


def test_cancelling_a_running_call_interrupts_it(
    transport_stack: Stack, count_dir: Path, held: list[tuple[Stack, str]]
) -> None:
    with served(transport_stack) as s:
        api = s.client
        task_id = enqueue(api, "local/wait_for_cancel", {"key": "run", "ms": HOLD_MS}, timeout=90)
        held.append((transport_stack, task_id))
        started(count_dir, "run")
        with events_of(api, task_id) as reader:
            assert reader.next() == Frame("status", {"state": "started"})
            answer = api.delete(f"/mcp/calls/{task_id}", headers=ADMIN)
            assert answer.status_code == 202, answer.text
            assert answer.json() == {"task_id": task_id, "state": "requested", "result": None}
            frames = reader.rest()
        assert kinds(frames) == ["result"], frames
        result = frames[0].data
        assert_cancelled(result, may_have_run=True)
        assert result["request_id"] == task_id
        # The server saw its request cancelled (notifications/cancelled over
        # stdio, or the HTTP request's stream closing).
        wait_until(lambda: read_events(count_dir, "run") == ["started", "cancelled"], 30)

        status = call_status(api, task_id)
        assert status["ready"] is True and status["result"] == result
        assert status["state"] == "SUCCESS"  # the task ended normally; its result says cancelled
        # Once it has ended, a second cancel changes nothing and says how it ended.
        again = api.delete(f"/mcp/calls/{task_id}", headers=ADMIN)
        assert again.status_code == 200, again.text
        assert again.json() == {"task_id": task_id, "state": "finished", "result": result}


def test_cancel_errors(api: httpx.Client) -> None:
    unknown = str(uuid.uuid4())
    body = error_of(api.delete(f"/mcp/calls/{unknown}", headers=ADMIN), 404, "call_not_found")
    assert body["details"] == {"id": unknown}
    for bad in MALFORMED_IDS:
        error_of(api.delete(f"/mcp/calls/{bad}", headers=ADMIN), 422, "invalid_arguments")
    error_of(api.delete(f"/mcp/calls/{unknown}"), 401, "unauthorized")


def test_a_waiting_call_cancelled_by_another_client_answers_409(
    served_api: Served, stack: Stack, count_dir: Path, held: list[tuple[Stack, str]]
) -> None:
    keys = Keys(stack.settings.key_prefix)
    body = {"tool": "local/wait_for_cancel", "arguments": {"key": "waited", "ms": HOLD_MS}, "timeout": 90}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(served_api.client.post, "/mcp/call", json=body, headers=ADMIN)
        started(count_dir, "waited")
        # The waiting request has not said its task id: the ledger knows it (the only call due).
        due = [str(call_id) for call_id in stack.state().hkeys(keys.ledger_messages)]
        assert len(due) == 1, due
        task_id = due[0]
        held.append((stack, task_id))
        assert not waiting.done()
        with httpx.Client(base_url=served_api.url, timeout=30) as other:
            cancel = other.delete(f"/mcp/calls/{task_id}", headers=ADMIN)
            assert cancel.status_code == 202, cancel.text
            assert cancel.json()["state"] == "requested"
        answer = waiting.result(60)
    result = error_of(answer, 409, "cancelled")
    assert_cancelled(result, may_have_run=True)
    assert result["request_id"] == task_id
    assert "location" not in answer.headers  # it ended: nothing to poll
    wait_until(lambda: read_events(count_dir, "waited") == ["started", "cancelled"], 30)
    assert call_status(served_api.client, task_id)["result"] == result
