"""Security, tested with a real worker: JSON only, commands only from config,
malformed messages answered, planted secrets found nowhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpq.worker.contract.task_names import CALL_TOOL
from tests.support.procs import (
    free_port,
    read_count,
    start_test_server,
    wait_until,
)
from tests.support.stack import Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEADER_SECRET = "PLANTED-HEADER-7f3a9c"
ENV_SECRET = "PLANTED-ENV-51b2e8"
URL_SECRET = "PLANTED-URLPASS-0d4c"
ARG_SECRET = "PLANTED-ARG-93e1aa"


def test_pickle_messages_are_refused_and_the_worker_keeps_running(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    worker = stack.start_worker()
    stack.queue.app.send_task(
        CALL_TOOL, kwargs={"tool": "count", "arguments": {"key": "pickled"}}, queue=stack.settings.queue,
        serializer="pickle",
    )  # fmt: skip
    wait_until(
        lambda: "untrusted content of type pickle" in worker.log_tail(100_000),
        30,
        interval=0.05,
        message=lambda: f"no refusal logged:\n{worker.log_tail()}",
    )
    assert stack.queue.call("count", {"key": "json"}, timeout=30).success
    assert read_count(count_dir, "pickled") == 0 and read_count(count_dir, "json") == 1


def test_malformed_task_messages_get_specific_errors(make_stack: Callable[..., Any], count_dir: Path) -> None:
    stack = make_stack({"local": stdio_server(count_dir)})
    stack.start_worker()
    send = stack.queue.app.send_task
    q = stack.settings.queue
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tool": 5}, "internal_error", "'tool' must be a non-empty string"),
        ({"arguments": {"a": 1}}, "internal_error", "tool"),  # missing field
        ({"tool": "add", "arguments": "a=1"}, "invalid_arguments", "must be a JSON object"),
        ({"tool": "add", "arguments": {}, "timeout": "soon"}, "internal_error", "'timeout'"),
        ({"tool": "add", "arguments": {}, "version": 9}, "internal_error", "unknown fields ['version']"),
        # A task names a server and a tool; nothing in it can choose a command.
        (
            {"tool": "count", "server": "local", "command": "touch", "args": ["/tmp/x"], "env": {"A": "1"}},
            "internal_error",
            "unknown fields ['args', 'command', 'env']",
        ),
    ]
    for kwargs, code, text in cases:
        result = stack.queue.get(send(CALL_TOOL, kwargs=kwargs, queue=q).id, CALL_TOOL).result(60)
        assert result.error_code == code, (kwargs, result)
        assert text in (result.error or ""), (kwargs, result.error)
    positional = stack.queue.get(send(CALL_TOOL, args=list(range(12)), queue=q).id, CALL_TOOL).result(60)
    assert positional.error_code == "internal_error"
    # The worker is still serving calls, and none of the malformed ones ran anything.
    assert stack.queue.call("count", {"key": "after"}, timeout=30).success
    assert read_count(count_dir, "after") == 1


def test_planted_secrets_appear_in_no_log_state_or_result(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    with start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as server:
        stack: Stack = make_stack(
            {
                "remote": {"url": server.url, "headers": {"Authorization": f"Bearer {HEADER_SECRET}"}},
                "local": {
                    **stdio_server(count_dir),
                    "env": {"MCPQ_TEST_COUNT_DIR": str(count_dir), "K": ENV_SECRET},
                },
                "down": {
                    "url": f"http://mcpq:{URL_SECRET}@127.0.0.1:{free_port()}/mcp",
                    "headers": {"X-Api-Key": HEADER_SECRET},
                    "retry_attempts": 0,
                },
            }
        )
        worker = stack.start_worker()
        results = [
            stack.queue.call("remote/echo", {"text": "hi", "api_token": ARG_SECRET}, timeout=30),
            stack.queue.call("local/echo", {"text": "hi", "password": ARG_SECRET}, timeout=30),
            stack.queue.call("down/echo", {"text": "hi"}, timeout=30),
            stack.queue.call("remote/add", {"a": "x", "b": 1, "secret": ARG_SECRET}, timeout=30),
        ]
        assert [r.error_code for r in results] == [None, None, "connection_error", "invalid_arguments"]
        stack.queue.discover()
        servers = stack.queue.servers()
        state = stack.state()
        state_dump = [str(state.dump(k)) + str(state.type(k)) for k in state.scan_iter()]
        values = []
        for key in state.scan_iter():
            kind = state.type(key)
            if kind == "string":
                values.append(state.get(key))
            elif kind == "hash":
                values.append(str(state.hgetall(key)))
        worker.stop()
        log = worker.log_tail(1_000_000)
    haystacks = {
        "worker log": log,
        "results": str([r.to_dict() for r in results]),
        "servers": str(servers),
        "state redis": "\n".join(str(v) for v in values),
    }
    assert state_dump  # the state Redis was inspected, not empty
    for secret in (HEADER_SECRET, ENV_SECRET, URL_SECRET, ARG_SECRET):
        for where, text in haystacks.items():
            assert secret not in text, f"{secret} leaked into {where}"
    assert "remote/echo" in log or "echo" in log  # the log was really captured
