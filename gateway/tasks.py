"""Long calls as tasks: the MCP Tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663).

For a 2026-07-28 request whose client capabilities declare the extension, a
``tools/call`` still running after ``task_after`` seconds (at once, for the
tools in ``task_tools``) is answered with a task whose id is the mcpq call id;
the call goes on in the fleet. ``tasks/get`` reads the call from the result
backend through :meth:`AsyncToolQueue.get`, ``tasks/cancel`` cancels it with
:meth:`AsyncToolQueue.cancel`: the gateway keeps no state, so any gateway
process answers for any task, and a task outlives the client's connection
and the gateway's restarts (for the result backend's ``result_expires``).

Other clients, and handshake-era sessions (whose results the SDK sieves to
the core shapes), always get the plain ``CallToolResult``. The gateway never
needs client input, so no task is ever ``input_required`` and ``tasks/update``
only acknowledges.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError as ProtocolLevelError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types import HEADER_MISMATCH, INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, EmptyResult
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpq.gateway.calls import Calls, Detached
from mcpq.gateway.extensions import client_declared, require_declared
from mcpq.gateway.task_wire import (
    EXTENSION,
    TaskIdParams,
    TaskResult,
    UpdateTaskParams,
    created_task,
    detailed_task,
)
from mcpq.producer.aio import AsyncToolQueue
from mcpq.producer.events import CallEvent, ResultEvent, StatusEvent
from mcpq.worker.contract.errors import CallNotFoundError, InvalidArgumentsError, MCPError
from mcpq.worker.contract.result import ToolResult

log = logging.getLogger("mcpq.gateway")

#: Default seconds a call may run before a declaring client gets a task instead.
DEFAULT_TASK_AFTER = 2.0
#: Default poll interval suggested to clients (milliseconds).
DEFAULT_POLL_INTERVAL_MS = 1000
#: Longest tasks/get waits for a result the call's state says has just been stored.
RESULT_SETTLE = 2.0


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """When calls become tasks.

    :param task_after: seconds a call may run before it is answered with a task (0: always).
    :param task_tools: exposed tool names always answered with a task.
    :param poll_interval_ms: the ``pollIntervalMs`` suggested to clients.
    """

    task_after: float = DEFAULT_TASK_AFTER
    task_tools: frozenset[str] = field(default_factory=frozenset)
    poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS

    def __post_init__(self) -> None:
        if self.task_after < 0:
            raise ValueError(f"task_after must be 0 or more seconds, not {self.task_after}")
        if self.poll_interval_ms < 1:
            raise ValueError(f"poll_interval_ms must be at least 1, not {self.poll_interval_ms}")

    def wait_for(self, tool: str) -> float:
        """Seconds to wait for ``tool``'s result before answering with a task."""
        return 0.0 if tool in self.task_tools else self.task_after


class TasksExtension(Extension):
    """``io.modelcontextprotocol/tasks`` on the gateway: tasks are mcpq calls.

    :param queue: where the calls are (tasks/get and tasks/cancel go through it).
    :param calls: the gateway's tools/call runner.
    :param options: when a call becomes a task.
    """

    identifier = EXTENSION

    def __init__(self, queue: AsyncToolQueue, calls: Calls, options: TaskOptions | None = None) -> None:
        self.queue = queue
        self.calls = calls
        self.options = options or TaskOptions()

    @property
    def ttl_ms(self) -> int:
        """How long a task can be read from its creation: results stay ``result_expires`` after they end."""
        return int(self.queue.settings.result_expires) * 1000

    def methods(self) -> Sequence[MethodBinding]:
        return (
            MethodBinding("tasks/get", TaskIdParams, self._get),
            MethodBinding("tasks/update", UpdateTaskParams, self._update),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel),
        )

    def offered(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether this request may be answered with a task (SEP-2663: only if it declares the extension)."""
        return ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS and client_declared(ctx, EXTENSION)

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if not self.offered(ctx):
            return await call_next(ctx)
        # Runs the call itself (not call_next): only Calls can hand a call back without cancelling it.
        outcome = await self.calls.run(ctx, params, detach_after=self.options.wait_for(params.name))
        if isinstance(outcome, Detached):
            log.info("call %s (%s) goes on as a task", outcome.call_id, outcome.tool)
            return created_task(
                outcome.call_id,
                ttl_ms=self.ttl_ms,
                poll_interval_ms=self.options.poll_interval_ms,
                now=dt.datetime.now(dt.UTC),
            )
        return outcome

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> TaskResult:
        self._check(ctx, params.task_id)
        result, message = await self._read(params.task_id)
        return detailed_task(
            params.task_id,
            result,
            ttl_ms=self.ttl_ms,
            poll_interval_ms=self.options.poll_interval_ms,
            now=dt.datetime.now(dt.UTC),
            message=message,
        )

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> EmptyResult:
        self._check(ctx, params.task_id)
        await self._read(params.task_id)  # an unknown task is an error; known ones never wait for input
        return EmptyResult(result_type="complete")

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> EmptyResult:
        self._check(ctx, params.task_id)
        try:
            outcome = await self.queue.cancel(params.task_id)
        except MCPError as exc:
            raise _protocol_error(params.task_id, exc) from None
        log.info("task %s: cancel %s", params.task_id, outcome.state)
        # An ack only: the task shows "cancelled" on tasks/get once the fleet has stopped it.
        return EmptyResult(result_type="complete")

    def _check(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> None:
        """The checks every tasks/* request passes: the extension declared, routing headers agreeing."""
        require_declared(ctx, EXTENSION)
        headers = getattr(ctx.request, "headers", None)
        named = None if headers is None else headers.get(MCP_NAME_HEADER)
        # SEP-2663: Mcp-Name carries the taskId on HTTP; a disagreeing one is refused, as for tools/call.
        if named is not None and decode_header_value(named) != task_id:
            raise ProtocolLevelError(
                code=HEADER_MISMATCH, message=f"{MCP_NAME_HEADER} header does not match the request's taskId"
            )

    async def _read(self, task_id: str) -> tuple[ToolResult | None, str | None]:
        """The call's result (None while it runs) and its latest progress message.

        :raises mcp.shared.exceptions.MCPError: ``-32602`` for an id no call has, ``-32603``
            if the fleet's Redis cannot be reached.
        """
        try:
            handle = self.queue.get(task_id, progress=True)
        except MCPError as exc:
            raise _protocol_error(task_id, exc) from None
        try:
            events = cast(AsyncGenerator[CallEvent, None], handle.events())
            try:
                first = await anext(events)
                # "finished" comes with the result (or just before it): a result stored is not "working".
                if isinstance(first, StatusEvent) and first.state == "finished":
                    try:
                        with anyio.fail_after(RESULT_SETTLE):
                            second = await anext(events)
                        if isinstance(second, ResultEvent):
                            return second.result, None
                    except TimeoutError:
                        pass
                elif isinstance(first, ResultEvent):  # pragma: no cover - events() starts with a status
                    return first.result, None
            finally:
                await events.aclose()
            progress = handle.progress
            return None, (progress.message if progress is not None else None)
        except MCPError as exc:
            raise _protocol_error(task_id, exc) from None
        finally:
            handle.close()


def _protocol_error(task_id: str, exc: MCPError) -> ProtocolLevelError:
    """The JSON-RPC error for an mcpq error while reading or cancelling task ``task_id``."""
    if isinstance(exc, CallNotFoundError | InvalidArgumentsError):
        return ProtocolLevelError(
            code=INVALID_PARAMS, message=f"Failed to retrieve task: {exc.message}", data={"taskId": task_id}
        )
    return ProtocolLevelError(code=INTERNAL_ERROR, message=f"cannot read task {task_id}: {exc.message}")
