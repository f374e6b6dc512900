"""Flower against a real stack: it sees every call (events are on), it keeps
argument secrets out of its API and pages (the producer's kwargsrepr), and its
API refuses clients without credentials.

Flower runs the way operators start it (``celery -A mcpq.worker flower``) with the
stack's MCPQ_* environment, in its own process group, killed at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import (
    REPO_ROOT,
    ServerProcess,
    free_port,
    group_members,
    wait_until,
)
from tests.support.stack import stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TASK_NAME = "mcpq.call_tool"
USER, PASSWORD = "flower-user", "flower-pw-4711"
SECRET = "SECRET-PLANTED-123"
RETRY_SECRET = "SECRET-PLANTED-456"
FLOWER_READY_TIMEOUT = 45.0
EVENTS_TIMEOUT = 30.0


class Flower:
    """A running ``celery -A mcpq.worker flower`` and an HTTP client for it."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.base = f"http://{proc.host}:{proc.port}"
        self.auth = httpx.Client(base_url=self.base, auth=(USER, PASSWORD), timeout=10.0)
        self.anon = httpx.Client(base_url=self.base, timeout=10.0)

    def get(self, path: str, **params: Any) -> httpx.Response:
        response = self.auth.get(path, params=params)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:500]}"
        return response

    def tasks(self, name: str = TASK_NAME) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = self.get("/api/tasks", taskname=name).json()
        return tasks

    def close(self) -> None:
        self.auth.close()
        self.anon.close()


@pytest.fixture()
def stack(make_stack: Callable[..., Any], count_dir: Path) -> Any:
    stack = make_stack(
        {
            # retry_delay small and idempotent: a flaky call is retried by re-enqueue at once.
            "local": stdio_server(count_dir, idempotent=True, retry_delay=0.05, retry_max_delay=0.1),
        }
    )
    stack.start_worker()
    return stack


@contextmanager
def running_flower(stack: Any, *extra: str) -> Iterator[Flower]:
    """``celery -A mcpq.worker flower`` with the stack's MCPQ_* environment; its process group is
    killed on the way out, whatever happened."""
    port = free_port()
    # Celery's own options (-A, --broker) go before the subcommand, Flower's after it;
    # Flower ignores (with a warning) celery options placed after `flower`.
    command = [
        sys.executable, "-m", "celery", "-A", "mcpq.worker", "--broker", stack.settings.broker_url,
        "flower", f"--port={port}", "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in stack.env.items() if not k.startswith("FLOWER_")}
    proc = ServerProcess(
        command, port, path="", env=env, cwd=REPO_ROOT, ready_timeout=FLOWER_READY_TIMEOUT, name="flower"
    )
    proc.start()  # waits until the port accepts connections (fails fast if Flower exits)
    client = Flower(proc)
    try:

        def healthy() -> bool:
            try:
                answer = client.anon.get("/healthcheck")
            except httpx.HTTPError:
                return False
            return answer.status_code == 200 and answer.text.strip() == "OK"

        wait_until(
            healthy,
            FLOWER_READY_TIMEOUT,
            interval=0.1,
            message=lambda: f"Flower /healthcheck never answered OK\n{proc.log_tail()}",
        )
        yield client
    finally:
        client.close()
        pgid = proc.pid
        proc.stop()  # SIGTERM to the process group, SIGKILL after a grace period
        assert not proc.running
        assert group_members(pgid) == [], "Flower left processes behind"


@pytest.fixture()
def flower(stack: Any) -> Iterator[Flower]:
    with running_flower(stack) as client:
        yield client


def _wait_for_states(
    flower: Flower, ids: list[str], timeout: float = EVENTS_TIMEOUT, name: str = TASK_NAME
) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        tasks = flower.tasks(name)
        if all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids):
            return tasks
        return None

    return wait_until(
        seen,
        timeout,
        interval=0.2,
        message=lambda: (
            f"Flower did not report SUCCESS for {ids}: "
            f"{ {i: flower.tasks(name).get(i, {}).get('state') for i in ids} }\n{flower.proc.log_tail()}"
        ),
    )


def _flower_listening(flower: Flower, stack: Any) -> None:
    """Flower only sees events sent after its event receiver connected, and
    /healthcheck answers before that: send a probe call until Flower reports it."""

    def probe_seen() -> bool:
        handle = stack.queue.submit("echo", {"text": "probe"}, timeout=30)
        assert handle.result(60).success
        try:
            _wait_for_states(flower, [handle.id], timeout=3.0)
        except AssertionError:
            return False
        return True

    wait_until(probe_seen, EVENTS_TIMEOUT, interval=0.1, message="Flower never saw a probe call's events")


def _assert_nowhere(flower: Flower, ids: list[str], secrets: list[str]) -> None:
    """No planted value in the task list, each task's info, each task page or the tasks table."""
    pages = {"/api/tasks": flower.get("/api/tasks", taskname=TASK_NAME).text}
    for task_id in ids:
        pages[f"/api/task/info/{task_id}"] = flower.get(f"/api/task/info/{task_id}").text
        pages[f"/task/{task_id}"] = flower.get(f"/task/{task_id}").text
    table = flower.get(
        "/tasks/datatable",
        **{"draw": 1, "start": 0, "length": 100, "order[0][column]": 0, "columns[0][data]": "name"},
    )
    assert {row["uuid"] for row in table.json()["data"]} >= set(ids)
    pages["/tasks/datatable"] = table.text
    for where, page in pages.items():
        for secret in secrets:
            assert secret not in page, f"{secret!r} shown by Flower at {where}: {page[:2000]}"


def test_flower_shows_calls_without_their_secrets(stack: Any, flower: Flower) -> None:
    _flower_listening(flower, stack)

    plain = stack.queue.submit("echo", {"text": "hello-flower"}, timeout=30)
    secret = stack.queue.submit("echo", {"text": "hi", "api_token": SECRET}, timeout=30)
    nested = stack.queue.submit(
        "local/echo", {"text": "nested", "options": {"Authorization": f"Bearer {SECRET}"}}, timeout=30
    )
    results = {h.id: h.result(60) for h in (plain, secret, nested)}
    assert all(r.success for r in results.values()), results
    assert results[secret.id].text == "hi"  # the worker got the arguments (the tool accepts extra keys)

    ids = list(results)
    tasks = _wait_for_states(flower, ids)
    for task_id in ids:
        assert tasks[task_id]["name"] == TASK_NAME
        assert tasks[task_id]["state"] == "SUCCESS"

    # The tool and the non-secret arguments are visible; secret values are masked.
    plain_info = flower.get(f"/api/task/info/{plain.id}").json()
    assert plain_info["kwargs"] == 'echo {"text":"hello-flower"}'
    shown = flower.get(f"/api/task/info/{secret.id}").json()
    assert shown["name"] == TASK_NAME and shown["state"] == "SUCCESS"
    assert shown["args"] == "()"
    assert shown["kwargs"] == 'echo {"text":"hi","api_token":"***"}', shown["kwargs"]
    nested_info = flower.get(f"/api/task/info/{nested.id}").json()
    assert nested_info["kwargs"] == 'local/echo {"text":"nested","options":{"Authorization":"***"}}'

    _assert_nowhere(flower, ids, [SECRET])
    # The worker's own log of the same calls holds no secret either.
    log = stack.workers[0].log_path.read_text(errors="replace")
    assert TASK_NAME in log
    assert SECRET not in log


def test_retried_call_keeps_its_secrets_out_of_flower(stack: Any, flower: Flower) -> None:
    _flower_listening(flower, stack)
    # Fails once, then is retried by re-enqueue: the retried message needs its own kwargsrepr.
    retried = stack.queue.submit(
        "flaky", {"key": "flower-retry", "failures": 1, "password": RETRY_SECRET}, timeout=30
    )
    result = retried.result(60)
    assert result.success and result.attempts == 2, result
    _wait_for_states(flower, [retried.id])
    assert flower.get(f"/api/task/info/{retried.id}").json()["kwargs"].startswith("flaky ")
    _assert_nowhere(flower, [retried.id], [RETRY_SECRET])
    assert RETRY_SECRET not in stack.workers[0].log_path.read_text(errors="replace")


def test_flower_shows_a_chunk_as_a_summary_of_its_calls(stack: Any, flower: Flower) -> None:
    _flower_listening(flower, stack)
    chunk_secret = "SECRET-PLANTED-789"
    handle = stack.queue.submit_many(
        [
            {"tool": "echo", "arguments": {"text": "a", "api_token": chunk_secret}},
            {"tool": "echo", "arguments": {"text": "b"}},
            {"tool": "local/add", "arguments": {"a": 1, "b": 2}},
        ],
        chunk_size=3,
    )
    results = handle.results(timeout=60)
    assert [r.success for r in results] == [True, True, True]
    [chunk_id] = handle.chunk_ids
    tasks = _wait_for_states(flower, [chunk_id], name="mcpq.call_chunk")
    assert tasks[chunk_id]["name"] == "mcpq.call_chunk"
    info = flower.get(f"/api/task/info/{chunk_id}").json()
    assert info["kwargs"] == "3 calls: echo x2, local/add x1" and info["args"] == "()"
    page = flower.get(f"/task/{chunk_id}").text + flower.get("/api/tasks").text
    assert chunk_secret not in page
    assert chunk_secret not in stack.workers[0].log_path.read_text(errors="replace")


def test_flower_api_needs_credentials_and_can_run_tools(stack: Any, flower: Flower) -> None:
    for path in ("/api/tasks", "/api/workers", f"/api/task/info/{'0' * 32}", "/api/queues/length"):
        assert flower.anon.get(path).status_code == 401, path
        wrong = flower.anon.get(path, auth=(USER, "wrong-password"))
        assert wrong.status_code == 401, path
    # Starting a task through Flower needs the same credentials.
    answer = flower.anon.post(f"/api/task/async-apply/{TASK_NAME}", json={"kwargs": {"tool": "echo"}})
    assert answer.status_code == 401
    assert flower.auth.get("/api/tasks").status_code == 200
    assert flower.anon.get("/healthcheck").status_code == 200  # open by design
    assert flower.anon.get("/metrics").status_code == 200  # Prometheus scrapes without credentials

    # With credentials, Flower's API starts tasks: access to it is the power to run tools.
    started = flower.auth.post(
        f"/api/task/async-apply/{TASK_NAME}", json={"kwargs": {"tool": "echo", "arguments": {"text": "via"}}}
    )
    assert started.status_code == 200, started.text
    task_id = started.json()["task-id"]

    def done() -> dict[str, Any] | None:
        answer: dict[str, Any] = flower.get(f"/api/task/result/{task_id}").json()
        return answer if answer.get("state") == "SUCCESS" else None

    result = wait_until(done, EVENTS_TIMEOUT, interval=0.2, message="the task Flower started never finished")
    assert result["result"]["success"] is True, result
    assert result["result"]["tool_name"] == "echo"


def test_read_only_flower_cannot_run_tools(stack: Any) -> None:
    with running_flower(stack, "--read-only=True") as flower:
        for endpoint in ("async-apply", "apply", "send-task"):
            answer = flower.auth.post(f"/api/task/{endpoint}/{TASK_NAME}", json={"kwargs": {"tool": "echo"}})
            assert answer.status_code == 403, (endpoint, answer.status_code, answer.text[:300])
        revoke = flower.auth.post(f"/api/task/revoke/{'0' * 32}")
        assert revoke.status_code == 403
        assert flower.get("/api/tasks").status_code == 200  # monitoring still works
