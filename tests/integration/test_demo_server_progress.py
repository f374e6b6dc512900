"""The bundled demo server's ``sleep`` reports progress to a caller that asks
(what ``mcpq call sleep ms=… --progress`` shows), through a real worker and
redis-server, and stays silent for one that does not."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest

from mcpq import AsyncToolQueue
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_sleep_reports_progress_from_its_start_to_its_end(make_stack: Callable[..., Any]) -> None:
    stack: Stack = make_stack(
        {"demo": {"command": sys.executable, "args": ["-m", "mcpq.worker.demo_server", "stdio"]}}
    )
    stack.start_worker()

    async def main() -> tuple[list[Any], Any, Any]:
        async with AsyncToolQueue(stack.settings) as q:
            handle = await q.submit("sleep", {"ms": 1200}, progress=True, timeout=60)
            events = [e async for e in handle.events()]
            quiet = await q.submit("sleep", {"ms": 600}, timeout=60)
            quiet_result = await quiet.result(60)
            return events, quiet.progress, quiet_result

    events, quiet_progress, quiet_result = asyncio.run(main())
    progress = [e for e in events if e.kind == "progress"]
    assert events[-1].kind == "result" and events[-1].result.text == "slept 1200 ms"
    assert len(progress) >= 2, events  # at the start, and at least once 500 ms later
    assert progress[0].progress < 100 and progress[0].total == 1200
    assert [p.progress for p in progress] == sorted(p.progress for p in progress)
    assert progress[-1].progress >= 500 and progress[-1].message.endswith("of 1200 ms")
    assert quiet_result.text == "slept 600 ms" and quiet_progress is None
