"""The Tasks extension's wire mapping (mcpq.gateway.task_wire) and options, without a fleet."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from mcpq.gateway.task_wire import TaskResult, created_at, created_task, detailed_task, new_call_id
from mcpq.gateway.tasks import TaskOptions
from mcpq.worker.contract.errors import CallCancelledError, CircuitOpenError, ErrorCode, InvalidArgumentsError
from mcpq.worker.contract.result import ToolResult

NOW = dt.datetime(2026, 7, 28, 12, 0, 0, tzinfo=dt.UTC)
TTL = 86_400_000


def wire(task: TaskResult) -> dict[str, Any]:
    """As the SDK's runner dumps a handler's model."""
    return task.model_dump(by_alias=True, mode="json", exclude_none=True)


def test_call_ids_are_uuid7_carrying_their_creation_time() -> None:
    ms = int(NOW.timestamp() * 1000) + 123
    call_id = new_call_id(ms)
    parsed = uuid.UUID(call_id)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert created_at(call_id) == dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    assert new_call_id(ms) != call_id  # the rest is random
    assert created_at(str(uuid.uuid4())) is None
    assert created_at("not-a-uuid") is None


def test_a_created_task_is_flat_with_the_sep_2663_fields() -> None:
    call_id = new_call_id(int(NOW.timestamp() * 1000))
    doc = wire(created_task(call_id, ttl_ms=TTL, poll_interval_ms=1000, now=NOW))
    assert doc == {
        "resultType": "task",
        "taskId": call_id,
        "status": "working",
        "statusMessage": doc["statusMessage"],
        "createdAt": "2026-07-28T12:00:00.000Z",
        "lastUpdatedAt": "2026-07-28T12:00:00.000Z",
        "ttlMs": TTL,
        "pollIntervalMs": 1000,
    }


def test_a_running_call_is_working_with_its_progress_message() -> None:
    call_id = str(uuid.uuid4())  # no time in it: createdAt falls back to now
    doc = wire(detailed_task(call_id, None, ttl_ms=TTL, poll_interval_ms=500, now=NOW, message="3 of 9"))
    assert doc["resultType"] == "complete"
    assert doc["status"] == "working" and doc["statusMessage"] == "3 of 9"
    assert doc["createdAt"] == "2026-07-28T12:00:00.000Z"
    assert not {"result", "error"} & doc.keys()


def test_a_result_is_completed_with_the_call_tool_result_inlined() -> None:
    call_id = new_call_id(int(NOW.timestamp() * 1000) - 5000)
    upstream = {"content": [{"type": "text", "text": "42"}], "isError": False}
    result = ToolResult.ok("t", "alpha", upstream, request_id=call_id, execution_time_ms=1500.0)
    doc = wire(detailed_task(call_id, result, ttl_ms=TTL, poll_interval_ms=1000, now=NOW))
    assert doc["status"] == "completed"
    assert doc["result"]["content"] == [{"type": "text", "text": "42"}]
    assert doc["result"]["_meta"]["mcpq/call"]["id"] == call_id
    assert doc["lastUpdatedAt"] == "2026-07-28T11:59:56.500Z"  # created + run time
    assert "error" not in doc


def test_an_mcpq_failure_is_completed_with_is_error_not_failed() -> None:
    result = ToolResult.failure("t", CircuitOpenError("alpha's breaker is open"), request_id="c1")
    doc = wire(detailed_task("c1", result, ttl_ms=TTL, poll_interval_ms=1000, now=NOW))
    assert doc["status"] == "completed" and doc["result"]["isError"] is True


def test_a_cancelled_call_is_cancelled() -> None:
    result = ToolResult.failure("t", CallCancelledError("cancelled by a caller"), request_id="c1")
    doc = wire(detailed_task("c1", result, ttl_ms=TTL, poll_interval_ms=1000, now=NOW))
    assert doc["status"] == "cancelled" and doc["statusMessage"] == "cancelled by a caller"
    assert not {"result", "error"} & doc.keys()


def test_a_request_error_is_failed_with_the_json_rpc_error() -> None:
    result = ToolResult.failure("t", InvalidArgumentsError("bad a", details={"tool": "t"}), request_id="c1")
    doc = wire(detailed_task("c1", result, ttl_ms=TTL, poll_interval_ms=1000, now=NOW))
    assert doc["status"] == "failed" and "result" not in doc
    assert doc["error"]["code"] == -32602 and doc["error"]["message"] == "bad a"
    assert doc["error"]["data"]["mcpq_code"] == ErrorCode.INVALID_ARGUMENTS


def test_task_options() -> None:
    options = TaskOptions(task_after=3.0, task_tools=frozenset({"long"}))
    assert options.wait_for("long") == 0.0 and options.wait_for("short") == 3.0
    with pytest.raises(ValueError):
        TaskOptions(task_after=-1)
    with pytest.raises(ValueError):
        TaskOptions(poll_interval_ms=0)
