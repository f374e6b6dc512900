"""The API's Server-Sent Events framing (producer/api.py), without a server:
what a stream of call events looks like on the wire, and how it ends when the
events cannot go on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from mcpq.producer.api import _sse_stream
from mcpq.producer.events import CallEvent, ProgressEvent, ResultEvent, StatusEvent
from mcpq.worker.contract.errors import MCPConnectionError
from mcpq.worker.contract.result import ToolResult

pytestmark = pytest.mark.timeout(30)


def frames(text: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in text.split("\n\n"):
        if not block or block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def run(first: CallEvent, rest: AsyncIterator[CallEvent]) -> tuple[str, list[str]]:
    closed: list[str] = []

    async def main() -> str:
        return "".join([chunk async for chunk in _sse_stream(first, rest, lambda: closed.append("closed"))])

    return asyncio.run(main()), closed


def test_events_end_with_the_result() -> None:
    result = ToolResult(success=True, tool_name="t", data={"content": []})

    async def rest() -> AsyncIterator[CallEvent]:
        yield ProgressEvent(1, 2, "half")
        yield ResultEvent(result)
        yield StatusEvent("never sent")

    text, closed = run(StatusEvent("queued"), rest())
    assert [kind for kind, _ in frames(text)] == ["status", "progress", "result"]
    assert frames(text)[1][1] == {"progress": 1, "total": 2, "message": "half"}
    assert frames(text)[2][1]["success"] is True
    assert closed == ["closed"]


def test_a_lost_result_backend_ends_the_stream_with_an_error_event() -> None:
    async def rest() -> AsyncIterator[CallEvent]:
        yield ProgressEvent(1, None, None)
        raise MCPConnectionError(
            "cannot reach the result backend at redis://h:6379/1", details={"service": "backend"}
        )

    text, closed = run(StatusEvent("started"), rest())
    kinds = frames(text)
    assert [kind for kind, _ in kinds] == ["status", "progress", "error"]
    assert kinds[-1][1] == {
        "error": "cannot reach the result backend at redis://h:6379/1",
        "error_code": "connection_error",
        "details": {"service": "backend"},
    }
    assert closed == ["closed"]
