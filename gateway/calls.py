"""``tools/call`` through the queue: one MCP request, one mcpq call.

The call is submitted to :class:`~mcpq.producer.aio.AsyncToolQueue`, so
routing, validation, breakers, limits, retries, claims and the ledger apply as
to any caller. The server's progress reaches the client's ``progressToken``.

Cancelling: a request the client cancels (``notifications/cancelled``; on a
2026-07-28 HTTP request, closing its stream, which that revision defines as
the cancel) cancels the mcpq call, queued or running. A handshake-era client
that merely goes away (its connection drops, stdin closes) and a gateway that
shuts down do not: those calls finish in the fleet, once, and their results
stay in the result backend. Nor does a call handed back as a task
(:meth:`Calls.run` with ``detach_after``, :mod:`mcpq.gateway.tasks`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError as ProtocolLevelError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types import CallToolRequestParams, CallToolResult
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpq.gateway.catalog import Catalog
from mcpq.gateway.metrics import ABANDONED, TASK, GatewayMetrics
from mcpq.gateway.results import outcome_of, request_error, to_mcp
from mcpq.gateway.task_wire import new_call_id
from mcpq.producer.aio import AsyncCallHandle, AsyncToolQueue
from mcpq.producer.events import ProgressEvent, ResultEvent
from mcpq.producer.submission import not_enqueued_result, timed_out_result
from mcpq.worker.contract.errors import ErrorCode, MCPError, MCPTimeoutError
from mcpq.worker.contract.result import ToolResult

log = logging.getLogger("mcpq.gateway")

#: Longest a cancel of an abandoned call may take before the handler gives up on it.
CANCEL_BUDGET = 5.0


@dataclass(frozen=True, slots=True)
class Detached:
    """A call handed back still running (:meth:`Calls.run` with ``detach_after``); it goes on in the fleet."""

    call_id: str
    tool: str


class Calls:
    """Runs the gateway's ``tools/call`` requests on ``queue``.

    :param queue: the queue every call goes through.
    :param catalog: what may be called, and where each name goes.
    :param metrics: where calls are counted (default: a registry of its own).
    """

    def __init__(
        self, queue: AsyncToolQueue, catalog: Catalog, metrics: GatewayMetrics | None = None
    ) -> None:
        self.queue = queue
        self.catalog = catalog
        self.metrics = metrics or GatewayMetrics(queue.settings.metrics_max_tools)
        #: Set while the gateway shuts down: abandoned requests are then not cancels.
        self.closing = False

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> CallToolResult:
        outcome = await self.run(ctx, params)
        assert isinstance(outcome, CallToolResult)  # never detached without detach_after
        return outcome

    async def run(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: CallToolRequestParams,
        *,
        detach_after: float | None = None,
    ) -> CallToolResult | Detached:
        """Submit the call and answer with its result, or hand it back still running.

        :param ctx: the ``tools/call`` request.
        :param params: its params.
        :param detach_after: seconds to wait for the result; a call not done by
            then is returned as :class:`Detached` and goes on in the fleet, not
            cancelled (None: wait for the result; 0: detach once it is submitted).
        """
        started = time.perf_counter()
        outcome = ABANDONED
        self.metrics.in_flight.inc()
        try:
            answer = await self._answer(ctx, params, detach_after)
            outcome = TASK if isinstance(answer, Detached) else outcome_of(answer)
            return answer
        except ProtocolLevelError as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.metrics.in_flight.dec()
            known = params.name if self.catalog.has(params.name) else None
            self.metrics.observe(self.metrics.tool_label(known), outcome, time.perf_counter() - started)

    async def _answer(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams, detach_after: float | None
    ) -> CallToolResult | Detached:
        try:
            entry = await self.catalog.find(params.name)
        except MCPError as exc:  # no catalog at all: the state Redis is unreachable
            return to_mcp(ToolResult.failure(params.name, exc))
        if entry is None:
            raise request_error(
                ErrorCode.TOOL_NOT_FOUND,
                f"no tool named {params.name!r} is offered by this gateway (see tools/list)",
                {"tool": params.name},
            )
        wants_progress = progress_token_from_params(ctx.params) is not None
        # Time-ordered, so a task's createdAt can be read from its id (task_wire.created_at).
        call_id = new_call_id()
        try:
            handle = await self.queue.submit(
                entry.tool,
                params.arguments or {},
                server=entry.server,
                request_id=call_id,
                progress=wants_progress,
            )
        except MCPError as exc:
            if type(exc) is MCPError:  # the queue is closed: the gateway is stopping
                raise
            return to_mcp(not_enqueued_result(entry.name, exc, call_id, self.queue.settings.broker_url))
        if detach_after is not None and detach_after <= 0:
            handle.close()
            return Detached(handle.id, entry.name)
        try:
            # This scope's own deadline ends the wait only: the except below sees the request's cancel.
            with anyio.move_on_after(math.inf if detach_after is None else detach_after):
                return to_mcp(await self._outcome(ctx, handle, entry.name, wants_progress))
            return Detached(handle.id, entry.name)
        except anyio.get_cancelled_exc_class():
            if not self.closing and _client_cancelled(ctx):
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_BUDGET):
                    await self._cancel(call_id)
            raise
        finally:
            handle.close()

    async def _outcome(
        self, ctx: ServerRequestContext[Any, Any], handle: AsyncCallHandle, label: str, wants_progress: bool
    ) -> ToolResult:
        try:
            if not wants_progress:
                return await handle.result()
            async for event in handle.events():
                if isinstance(event, ProgressEvent):
                    await ctx.session.report_progress(event.progress, event.total, event.message)
                elif isinstance(event, ResultEvent):
                    return event.result
            raise AssertionError("a call's events end with its result")  # pragma: no cover
        except MCPTimeoutError as exc:
            return timed_out_result(label, exc, handle.id, handle.id)
        except MCPError as exc:
            if type(exc) is MCPError:  # the queue closed: the gateway is stopping
                raise
            return ToolResult.failure(label, exc, request_id=handle.id)  # e.g. the result backend was lost

    async def _cancel(self, call_id: str) -> None:
        try:
            await self.queue.cancel(call_id)
        except MCPError as exc:
            log.warning("could not cancel call %s the client abandoned: %s", call_id, exc.message)


def _client_cancelled(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the client asked for the request it abandoned to be cancelled."""
    if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return True  # 2026-07-28: a closed request stream is the cancel
    # The request's dispatch context says whether notifications/cancelled came
    # (DispatchContext.cancel_requested); the SDK's ServerSession keeps it private.
    dispatch = getattr(ctx.session, "_request_outbound", None)
    event = getattr(dispatch, "cancel_requested", None)
    return bool(event is not None and event.is_set())
