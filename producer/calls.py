"""The values of a fan-out: one call, where a batch stands, and what a finished
task means as a :class:`ToolResult`.

Pure data and conversions, no broker: the engine (:mod:`mcpq.producer.engine`),
the result collector (:mod:`mcpq.producer.collector`) and ``mcpq batch`` all
build on these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import states

from mcpq.worker.contract.arguments import check_arguments
from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError
from mcpq.worker.contract.numbers import seconds
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult

#: Most calls :func:`auto_chunk_size` packs into one chunk task.
MAX_AUTO_CHUNK = 25

ProgressCallback = Callable[["Progress"], None]
#: ``on_call_progress(index, update)``: one call of a batch reported progress.
CallProgressCallback = Callable[[int, ProgressUpdate], None]

_CALL_KEYS = frozenset({"tool", "arguments", "server", "timeout"})


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call of a batch. ``tool`` may be ``server/tool``."""

    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    server: str | None = None
    timeout: float | None = None

    @property
    def label(self) -> str:
        """``server/tool``, or ``tool`` when no server is named: how results name the call."""
        return self.tool if self.server is None else f"{self.server}/{self.tool}"

    @classmethod
    def from_dict(
        cls,
        raw: Any,
        *,
        default_server: str | None = None,
        default_timeout: float | None = None,
    ) -> Call:
        """``{"tool": ..., "arguments": {...}, "server": ..., "timeout": ...}`` -> Call.

        Raises :class:`InvalidArgumentsError` saying what is wrong. ``server``
        and ``timeout`` fall back to the defaults when absent or null."""
        if not isinstance(raw, Mapping):
            raise InvalidArgumentsError(f"a call must be a JSON object, got {_type_name(raw)}")
        unknown = sorted(str(k) for k in raw if k not in _CALL_KEYS)
        if unknown:
            raise InvalidArgumentsError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; "
                f"a call has {', '.join(sorted(_CALL_KEYS))}"
            )
        tool = raw.get("tool")
        if tool is None:
            raise InvalidArgumentsError("missing 'tool'")
        if not isinstance(tool, str) or not tool.strip():
            raise InvalidArgumentsError(f"'tool' must be a non-empty string, got {_type_name(tool)}")
        arguments = raw.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            raise InvalidArgumentsError(
                f"'arguments' of {tool!r} must be a JSON object, got {_type_name(arguments)}"
            )
        server = raw.get("server")
        if server is None:
            server = default_server
        elif not isinstance(server, str) or not server:
            raise InvalidArgumentsError(f"'server' must be a non-empty string, got {_type_name(server)}")
        timeout = raw.get("timeout")
        if timeout is None:
            timeout = default_timeout
        elif isinstance(timeout, str):
            raise InvalidArgumentsError(f"'timeout' must be a positive number of seconds, got {timeout!r}")
        else:
            try:
                timeout = seconds(timeout, "'timeout'")
            except ValueError as exc:
                raise InvalidArgumentsError(str(exc)) from None
        check_arguments(dict(arguments), tool)
        return cls(
            tool=tool,
            arguments=dict(arguments),
            server=server,
            timeout=float(timeout) if timeout is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a batch stands. ``total`` is None while the input's length is unknown
    (a generator not read to its end yet)."""

    done: int
    failed: int
    total: int | None
    #: Calls published (or answered without publishing) so far.
    submitted: int = 0
    #: Seconds since the batch started.
    elapsed: float = 0.0

    @property
    def succeeded(self) -> int:
        return self.done - self.failed

    @property
    def in_flight(self) -> int:
        return self.submitted - self.done

    @property
    def rate(self) -> float:
        """Calls finished per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None when unknown)."""
        if self.total is None or self.done == 0:
            return None
        return max(self.total - self.done, 0) / self.rate if self.rate > 0 else None


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def auto_chunk_size(total: int | None) -> int:
    """Calls per chunk task when the caller names none: one per task for a small
    batch (its calls spread over every free worker slot at once), more as the
    batch grows, up to :data:`MAX_AUTO_CHUNK` (a batch of unknown length too),
    while a batch still makes at least 16 tasks to spread over workers."""
    if total is None:
        return MAX_AUTO_CHUNK
    return max(1, min(MAX_AUTO_CHUNK, total // 16))


def coerce_call(item: Call | Mapping[str, Any]) -> Call:
    """A Call as is; a mapping through :meth:`Call.from_dict` (may raise InvalidArgumentsError)."""
    return item if isinstance(item, Call) else Call.from_dict(item)


def task_result_to_tool_result(label: str, task_id: str, state: str, value: Any) -> ToolResult:
    """What a finished ``mcpq.call_tool`` task means as a ToolResult: its own
    result when it returned one, else an ``internal_error`` that says why.

    ``label`` names the call in a made-up result, ``task_id`` is the call's task
    id, ``state`` and ``value`` are the task's Celery state and stored result."""
    if state == states.SUCCESS and isinstance(value, dict) and "success" in value:
        try:
            return ToolResult.from_dict(value)
        except (TypeError, ValueError):
            pass
    return ToolResult(
        success=False,
        tool_name=label,
        error=f"task {task_id} ended in state {state}: {value!r}"[:2000],
        error_code=ErrorCode.INTERNAL_ERROR.value,
        request_id=task_id,
        details={"task_id": task_id, "state": state},
    )


def invalid_call_result(item: Any, index: int, exc: InvalidArgumentsError) -> ToolResult:
    """The failed ``invalid_arguments`` result of input item ``index``, which is
    not a call (``exc`` says why): it is answered without being published."""
    tool = item.get("tool") if isinstance(item, Mapping) else None
    return ToolResult(
        success=False,
        tool_name=tool if isinstance(tool, str) and tool else "?",
        error=f"call {index}: {exc.message}",
        error_code=ErrorCode.INVALID_ARGUMENTS.value,
        details={"index": index},
    )


def item_label(item: Any) -> str:
    """How a batch names an input item before it is checked: ``server/tool``,
    the tool, or ``?`` (whatever the item holds, even a malformed one)."""
    if isinstance(item, Call):
        return item.label
    tool = item.get("tool") if isinstance(item, Mapping) else None
    server = item.get("server") if isinstance(item, Mapping) else None
    name = tool if isinstance(tool, str) and tool else "?"
    return f"{server}/{name}" if isinstance(server, str) and server else name


def unsent_cancelled_result(
    item: Any, index: int, task_id: str | None, *, what: str = "call", key: str = "index", why: str = ""
) -> ToolResult:
    """The ``cancelled`` result of input item ``index`` of a batch cancelled
    before the item was published: it never reached a worker.

    :param task_id: the id it was given up front, if any.
    :param what: how the message names an item (``mcpq batch``: ``line``).
    :param key: the details key that holds ``index``.
    :param why: said after "cancelled" (`` (Ctrl-C)``).
    """
    return ToolResult(
        success=False,
        tool_name=item_label(item),
        error=f"{what} {index} was cancelled{why} before it was sent",
        error_code=ErrorCode.CANCELLED.value,
        request_id=task_id,
        attempts=0,
        details={key: index, "may_have_run": False, "retry_safe": False, "sent": False},
    )
