"""The worker's spans: one ``execute_tool {tool}`` span per call attempt,
around :meth:`ToolRouter.call`, with the OpenTelemetry MCP semantic
conventions' attributes and mcpq's own.

Where its parent comes from:

* ``mcpq.call_tool``: Celery's run span (``run/mcpq.call_tool``, from the
  instrumentation, which continues the producer's trace from the message
  headers), current on the task's thread;
* a chunk's call (:func:`chunk_call`, on the chunk's thread pool): the
  submit span its entry carries (``trace``), else none: each call of a
  fan-out is a trace of its own, *linked* to the chunk's run span.

The MCP request runs on the process's loop thread (:mod:`mcpq.worker.loop`).
:func:`handoff` takes the call's context on the task thread and
:func:`resumed` makes it current again around the SDK's request, so the SDK's
``MCP send tools/call`` span is this span's child and the ``traceparent`` the
SDK puts into ``params._meta`` carries this trace to the server. (CPython's
``run_coroutine_threadsafe`` happens to copy the caller's context too; this
does not rely on it.)

Off (:func:`mcpq.worker.contract.tracing.active` is None), every function
here returns at once and nothing of OpenTelemetry's SDK is imported.
Arguments and results never become attributes: only names, numbers and
error codes do.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from mcpq.worker.contract import tracing
from mcpq.worker.contract.result import ToolResult

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

P = ParamSpec("P")
T = TypeVar("T")

#: ``network.transport`` by server transport (stdio is a pipe; the rest are HTTP over TCP).
NETWORK_TRANSPORT = {"stdio": "pipe"}

#: The OTel context key under which a chunk call finds the links of its span.
_LINKS_KEY = "mcpq.links"


class CallSpan:
    """The span of one call attempt (when tracing is on).

    Attributes the task thread learns during the call (target, admission,
    outcome) wait in ``pending`` and go to the span in one ``set_attributes``
    at the end: each SDK ``set_attribute`` takes the span's lock and checks
    the value. The loop thread's (:meth:`session`) goes to the span directly,
    so that ``pending`` has one writer.
    """

    __slots__ = ("has_server", "pending", "span")

    def __init__(self, span: Span, server: str | None) -> None:
        self.span = span
        self.has_server = bool(server)
        self.pending: dict[str, Any] = {}

    def target(self, server: str, transport: str) -> None:
        self.has_server = True
        self.pending["mcpq.server"] = server
        self.pending["network.transport"] = NETWORK_TRANSPORT.get(transport, "tcp")

    def admission(self, decision: str) -> None:
        self.pending["mcpq.breaker.decision"] = decision

    def session(self, client: Any) -> None:
        """On the loop thread, with the session the request goes out on."""
        try:
            version = client.protocol_version
        except Exception:  # not connected: nothing to say
            return
        if isinstance(version, str) and version:
            self.span.set_attribute("mcp.protocol.version", version)
        # mcp.session.id: the SDK 2.3 Client does not expose the Streamable HTTP session id.

    def finish(self, result: ToolResult) -> None:
        if result.server_name and not self.has_server:
            self.pending["mcpq.server"] = result.server_name
        if result.details.get("redelivered"):
            self.pending["mcpq.redelivered"] = True
        if not result.success and result.error_code:
            self.pending["error.type"] = self.pending["mcpq.error_code"] = result.error_code
            from opentelemetry.trace import StatusCode

            # The code only: an error message may quote the tool's output.
            self.span.set_status(StatusCode.ERROR, result.error_code)

    def flush(self) -> None:
        if self.pending:
            self.span.set_attributes(self.pending)
            self.pending = {}


class _NoSpan:
    """What the router holds when tracing is off: every method does nothing."""

    __slots__ = ()

    def target(self, server: str, transport: str) -> None:
        return

    def admission(self, decision: str) -> None:
        return

    def session(self, client: Any) -> None:
        return

    def finish(self, result: ToolResult) -> None:
        return


NO_SPAN = _NoSpan()
_NO_SPAN_CM: AbstractContextManager[CallSpan | _NoSpan] = contextlib.nullcontext(NO_SPAN)
_NULL: AbstractContextManager[None] = contextlib.nullcontext()

#: The call span open on this thread (the router's deeper steps annotate it).
_current: contextvars.ContextVar[CallSpan | None] = contextvars.ContextVar("mcpq_call_span", default=None)
#: Seconds the next call on this thread waited in the queue (:func:`queued`).
_queue_wait: contextvars.ContextVar[float | None] = contextvars.ContextVar("mcpq_queue_wait", default=None)


def call_span(tool: str, server: str | None, attempt: int) -> AbstractContextManager[CallSpan | _NoSpan]:
    """The span of one call attempt, current for the block (:data:`NO_SPAN` when off)."""
    active = tracing.active()
    if active is None:
        return _NO_SPAN_CM
    return _CallSpanScope(active, tool, server, attempt)


#: (tool, server) -> (span name, the attributes every attempt of it starts with);
#: built once per tool rather than per call. Bounded: tool names come from messages.
_names: dict[tuple[str, str | None], tuple[str, str | None, dict[str, Any]]] = {}
_MAX_NAMES = 1024


def _named(tool: str, server: str | None) -> tuple[str, str | None, dict[str, Any]]:
    key = (tool, server)
    found = _names.get(key)
    if found is None:
        tool, server = tracing.split_qualified(tool, server)
        attributes: dict[str, Any] = {
            "mcp.method.name": "tools/call",
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool,
        }
        if server:
            attributes["mcpq.server"] = server
        if len(_names) >= _MAX_NAMES:
            _names.clear()
        found = _names[key] = (f"execute_tool {tool}", server, attributes)
    return found


class _CallSpanScope:
    """The call span's block: the span started, made current on this thread,
    ended. A class rather than ``start_as_current_span`` (a generator context
    manager inside a decorator inside another generator): this runs once per
    call, and the layers cost more than the span on cheap calls."""

    __slots__ = ("_active", "_attempt", "_handle", "_server", "_tokens", "_tool")

    def __init__(self, active: tracing.Tracing, tool: str, server: str | None, attempt: int) -> None:
        self._active = active
        self._tool, self._server, self._attempt = tool, server, attempt
        self._handle: CallSpan | None = None
        self._tokens: tuple[contextvars.Token[Context], contextvars.Token[CallSpan | None]] | None = None

    def __enter__(self) -> CallSpan:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind

        name, server, base = _named(self._tool, self._server)
        attributes = {**base, "mcpq.attempt": self._attempt}
        waited = _queue_wait.get()
        if waited is not None:
            _queue_wait.set(None)
            attributes["mcpq.queue_wait_ms"] = round(waited * 1000, 3)
        links = context.get_value(_LINKS_KEY)
        span = self._active.tracer.start_span(
            name,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=links if isinstance(links, list) else None,
            record_exception=False,  # an exception's message may quote an argument
            set_status_on_exception=False,
        )
        handle = self._handle = CallSpan(span, server)
        self._tokens = (context.attach(trace.set_span_in_context(span)), _current.set(handle))
        return handle

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        from opentelemetry import context

        handle, tokens = self._handle, self._tokens
        assert handle is not None and tokens is not None
        try:
            if kind is not None:
                from opentelemetry.trace import StatusCode

                handle.pending["error.type"] = kind.__qualname__
                handle.span.set_status(StatusCode.ERROR)
            handle.flush()
            handle.span.end()
        finally:
            _current.reset(tokens[1])
            context.detach(tokens[0])


def current() -> CallSpan | _NoSpan:
    """The call span open on this thread, or :data:`NO_SPAN`."""
    return _current.get() or NO_SPAN


def queued(seconds: float | None) -> None:
    """How long the next call on this thread waited in the queue (None: not known)."""
    if seconds is not None and tracing.active() is not None:
        _queue_wait.set(seconds)


# -- the loop-thread hop --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the loop thread needs to continue a call's span."""

    context: Context
    span: CallSpan


def handoff() -> Handoff | None:
    """On the task thread, before handing the request to the loop thread."""
    span = _current.get()
    if span is None:
        return None
    from opentelemetry import context

    return Handoff(context.get_current(), span)


def resumed(hand: Handoff | None, client: Any) -> AbstractContextManager[None]:
    """On the loop thread, around the MCP request: the call's context is
    current again, and the session's protocol version is noted."""
    if hand is None:
        return _NULL
    return _resumed(hand, client)


@contextlib.contextmanager
def _resumed(hand: Handoff, client: Any) -> Iterator[None]:
    from opentelemetry import context

    token = context.attach(hand.context)
    try:
        hand.span.session(client)
        yield
    finally:
        context.detach(token)


# -- chunks ---------------------------------------------------------------------------------


def chunk_call(fn: Callable[P, T], entry: Any) -> Callable[P, T]:
    """``fn`` (one call of a chunk) made to run, on another thread, in its own
    trace context: the chunk entry's ``trace`` (the submit span of an asyncio
    face's call), else a new trace; either way linked to the chunk's span,
    which is current here. Off: ``fn`` itself."""
    if tracing.active() is None:
        return fn
    from opentelemetry import context, trace
    from opentelemetry.propagate import extract

    chunk = trace.get_current_span().get_span_context()
    carried = tracing.checked_carrier(entry.get("trace")) if isinstance(entry, dict) else None
    parent = extract(carried) if carried else context.Context()
    links = [trace.Link(chunk, {"mcpq.link": "chunk"})] if chunk.is_valid else []
    ctx = context.set_value(_LINKS_KEY, links, parent)
    enqueued_at = entry.get("enqueued_at") if isinstance(entry, dict) else None

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        token = context.attach(ctx)
        try:
            if isinstance(enqueued_at, int | float) and not isinstance(enqueued_at, bool):
                waited = time.time() - enqueued_at
                queued(max(waited, 0.0) if math.isfinite(waited) else None)
            return fn(*args, **kwargs)
        finally:
            _queue_wait.set(None)
            context.detach(token)

    return run
