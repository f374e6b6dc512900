"""What comes after one attempt of a call: its final result, or another attempt later.

One rule for both ways a call runs (alone in ``mcpq.call_tool``, or inside an
``mcpq.call_chunk``), so packing calls into chunks cannot change what happens
to any one of them. Waiting and retrying never hold a worker slot: the caller
re-enqueues the call as an ``mcpq.call_tool`` message with a countdown.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from mcpq.worker.claims import CallInProgress
from mcpq.worker.config import MCPQConfig
from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.result import ToolResult

log = logging.getLogger(__name__)

#: Longest pause before asking again about a call another delivery is running.
BUSY_WAIT_MAX = 5.0
BUSY_WAIT_MIN = 0.2


@dataclass(frozen=True, slots=True)
class Again:
    """Run the call again after ``countdown`` seconds, with these task kwargs changed."""

    countdown: float
    changes: dict[str, Any] = field(default_factory=dict)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter for the retry after ``attempt``."""
    return float(min(cap, base * 2.0 ** (attempt - 1))) * random.uniform(0.5, 1.0)


def _wait_countdown(result: ToolResult, waits: int) -> float:
    """How long to stay off a worker slot before asking again (limits, open breakers)."""
    hinted = float(result.details.get("retry_after") or 0.0)
    fallback = min(1.0, 0.05 * 2 ** min(waits, 5)) * random.uniform(0.5, 1.5)
    return float(max(hinted, 0.0) or fallback)


def when_busy(busy: CallInProgress) -> Again:
    """A duplicate delivery while the first is still running: ask again off-slot;
    the claim then holds the one result, or shows that its owner died."""
    return Again(max(min(busy.retry_after, BUSY_WAIT_MAX), BUSY_WAIT_MIN))


def next_step(
    config: MCPQConfig, result: ToolResult, *, attempt: int, waits: int, deadline_at: float
) -> Again | None:
    """None when ``result`` is the call's final answer (it may be amended: a
    wait given up at the deadline says so); otherwise when and how to try again."""
    if result.error_code == ErrorCode.CANCELLED:
        return None  # a caller's cancel is final, whatever else the result says
    if result.error_code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.CIRCUIT_OPEN):
        wants_wait = result.error_code == ErrorCode.LIMIT_EXCEEDED or result.details.get("defer")
        countdown = _wait_countdown(result, waits)
        if wants_wait and time.time() + countdown < deadline_at:
            return Again(countdown, {"waits": waits + 1})
        if wants_wait:
            result.error = f"{result.error}; gave up waiting at the call's deadline"
        return None

    if not result.success and result.details.get("retry_safe") and result.server_name:
        policy = config.mcp_servers[result.server_name]
        if attempt <= policy.retry_attempts:
            countdown = backoff(attempt, policy.retry_delay, policy.retry_max_delay)
            log.info(
                "call %s to %r failed (%s); attempt %d of %d in %.2fs",
                result.request_id, result.server_name, result.error_code,
                attempt + 1, policy.retry_attempts + 1, countdown,
            )  # fmt: skip
            return Again(countdown, {"attempt": attempt + 1, "deadline_at": None})
    return None
