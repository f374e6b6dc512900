"""Traces (OpenTelemetry): whether they are on in this process, the one set-up,
and carrying a call's trace context across threads and messages.

Shared by the producer and the worker. **Off unless asked**, and off costs
nothing: this module imports nothing of OpenTelemetry until :func:`active`
finds tracing wanted. The rule (:func:`wanted`, docs/observability.md):

* ``OTEL_SDK_DISABLED=true`` turns it off, whatever else is set;
* else ``OTEL_TRACES_EXPORTER`` set to anything but ``none`` turns it on;
* else (the variable unset) ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set turns it on, exporting OTLP;
* or the application calls :func:`enable` (an app that sets OpenTelemetry
  up in code and hands mcpq its tracer provider).

When on, mcpq uses the application's tracer provider if one is installed
globally, else installs one made from the ``OTEL_*`` environment (exporters
from ``OTEL_TRACES_EXPORTER``, default ``otlp`` over HTTP/protobuf; sampler,
resource and batch settings as the SDK reads them). Celery's publish and run
spans come from ``opentelemetry-instrumentation-celery``, which also carries
the context in the task message's headers. The MCP SDK makes its own client
span for every request and puts its ``traceparent`` in ``params._meta``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from mcpq.worker.contract.version import package_version

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

#: The name mcpq's own spans are made under (the instrumentation scope).
SCOPE = "mcpq"

#: Chunk entries carry at most this many trace headers, each at most this long.
MAX_CARRIER_ITEMS = 8
MAX_CARRIER_VALUE = 1024

_NULL: AbstractContextManager[None] = contextlib.nullcontext()


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry environment asks for traces (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters:
        return any(name.strip().lower() not in ("", "none") for name in exporters.split(","))
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


class Tracing:
    """Tracing as set up in this process: the provider and mcpq's tracer."""

    def __init__(self, provider: Any, owned: bool, instrumented_celery: bool) -> None:
        self.provider = provider
        #: mcpq made the provider (and shuts it down); else it is the application's.
        self.owned = owned
        self.instrumented_celery = instrumented_celery
        self.tracer: Tracer = provider.get_tracer(SCOPE, package_version())

    def shutdown(self) -> None:
        """Export what is buffered; shut the provider down if mcpq made it."""
        try:
            if self.owned:
                self.provider.shutdown()
            elif hasattr(self.provider, "force_flush"):
                self.provider.force_flush()
        except Exception:  # exporting at exit is best effort
            log.warning("exporting the last spans failed", exc_info=True)


_lock = threading.Lock()
_decided = False
_active: Tracing | None = None
_requested_provider: Any = None


def active() -> Tracing | None:
    """Tracing in this process, or None when it is off (decided once, on first use)."""
    if _decided:
        return _active
    return setup()


def setup(role: str = "producer") -> Tracing | None:
    """Decide whether tracing is on and set it up, once per process.

    :param role: ``producer`` or ``worker``: the default ``service.name``
        (``mcpq-<role>``) when the environment names none.
    """
    global _decided, _active
    with _lock:
        if _decided:
            return _active
        if _requested_provider is not None or wanted():
            try:
                _active = _start(role, _requested_provider)
            except ImportError as exc:
                log.warning(
                    "OpenTelemetry tracing was asked for but is not installed (%s); "
                    'install mcpq[otel] (pip install "mcpq[otel]"). Tracing stays off.',
                    exc,
                )
                _active = None
        _decided = True
        return _active


def enable(tracer_provider: Any = None, role: str = "producer") -> Tracing | None:
    """Turn tracing on in this process whatever the environment says.

    :param tracer_provider: the provider mcpq's spans (and Celery's) go to;
        default: the global one, or one made from the ``OTEL_*`` environment.
    """
    global _requested_provider, _decided
    reset()
    with _lock:
        _requested_provider = tracer_provider if tracer_provider is not None else _GLOBAL
        _decided = False
    return setup(role)


def reset() -> None:
    """Forget the decision (tests): Celery is uninstrumented again if mcpq
    instrumented it; a provider mcpq installed globally stays installed."""
    global _decided, _active, _requested_provider
    with _lock:
        current, _active, _decided, _requested_provider = _active, None, False, None
    if current is not None and current.instrumented_celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().uninstrument()


def shutdown() -> None:
    """At process exit: export the spans still buffered."""
    if _active is not None:
        _active.shutdown()


_GLOBAL = object()  # enable() without a provider: the global one or one from the environment


def _start(role: str, requested: Any) -> Tracing:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    owned = False
    provider: Any = requested if requested is not None and requested is not _GLOBAL else None
    if provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current  # the application's own set-up wins
        else:
            provider = _provider_from_env(role)
            trace.set_tracer_provider(provider)  # the MCP SDK's spans go to the global provider
            owned = True
    instrumentor = CeleryInstrumentor()
    instrumented = not instrumentor.is_instrumented_by_opentelemetry
    if instrumented:
        instrumentor.instrument(tracer_provider=provider)
    return Tracing(provider, owned=owned, instrumented_celery=instrumented)


def _provider_from_env(role: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"mcpq-{role}"}))
    provider = TracerProvider(resource=_hashed_once(resource))
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _hashed_once(resource: Any) -> Any:
    """``resource`` with its hash computed once. The OTLP encoder groups every
    span it exports by resource (a dict keyed by it), and ``Resource.__hash__``
    serializes all the attributes to JSON each time: some 4 µs a span, a tenth
    of the export's cost. A resource's attributes cannot change."""
    from opentelemetry.sdk.resources import Resource

    class HashedResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedResource(resource.attributes, resource.schema_url)


def _exporters() -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``)."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    out: list[Any] = []
    for name in dict.fromkeys(n for n in names if n and n != "none"):
        if name == "otlp":
            name = _otlp_entry_point()
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
            continue
        if name == "otlp_proto_http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
            continue
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            log.warning("OTEL_TRACES_EXPORTER names %r, which is not installed; no spans go there", name)
            continue
        out.append(next(iter(found)).load()())
    return out


def _otlp_entry_point() -> str:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    return "otlp_proto_grpc" if protocol.strip().lower() == "grpc" else "otlp_proto_http"


# -- carrying context ------------------------------------------------------------------


def carrier() -> dict[str, str] | None:
    """The current trace context as propagation headers (``traceparent``,
    ``tracestate``), or None: tracing off, or no span is current."""
    if active() is None:
        return None
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers or None


def checked_carrier(value: Any) -> dict[str, str] | None:
    """``value`` if it is a carrier this module would make (a small mapping of
    short strings), else None: a message is input, and tracing never fails a call."""
    if not isinstance(value, dict) or not value or len(value) > MAX_CARRIER_ITEMS:
        return None
    if not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= MAX_CARRIER_VALUE
        for k, v in value.items()
    ):
        return None
    return value


def attached(headers: Mapping[str, str] | None) -> AbstractContextManager[None]:
    """Make the trace context in ``headers`` current in this thread for the
    block (another thread's, or a message's); a no-op when off or empty."""
    if not headers or active() is None:
        return _NULL
    return _attached(headers)


@contextlib.contextmanager
def _attached(headers: Mapping[str, str]) -> Iterator[None]:
    from opentelemetry import context
    from opentelemetry.propagate import extract

    token = context.attach(extract(headers))
    try:
        yield
    finally:
        context.detach(token)


# -- the producer's span ------------------------------------------------------------------


def submit_span(tool: str, server: str | None, queue: str | None) -> AbstractContextManager[None]:
    """The producer's span of one ``submit`` (``submit {tool}``): validation,
    ledger, idempotency key and publishing; Celery's publish span is its child.
    Attribute values are names only, never arguments."""
    tracing = active()
    if tracing is None:
        return _NULL
    return _submit_span(tracing, tool, server, queue)


def fan_out_call_span(tool: str, server: str | None, queue: str | None) -> AbstractContextManager[None]:
    """A fan-out call's own ``submit {tool}`` span, published as one ``mcpq.call_tool``
    (``chunk_size=1``): the root of a trace of its own, *linked* to the current
    (batch) span (link attribute ``mcpq.link`` = ``batch``), as a chunk's calls
    are linked to their chunk: a batch is many small traces, not one giant one."""
    tracing = active()
    if tracing is None:
        return _NULL
    return _submit_span(tracing, tool, server, queue, own_trace=True)


@contextlib.contextmanager
def _submit_span(
    tracing: Tracing, tool: str, server: str | None, queue: str | None, own_trace: bool = False
) -> Iterator[None]:
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind, StatusCode

    parent: Any = None
    links: list[Any] = []
    if own_trace:
        batch = trace.get_current_span().get_span_context()
        links = [trace.Link(batch, {"mcpq.link": "batch"})] if batch.is_valid else []
        parent = context.Context()  # no parent: a new trace
    tool, server = split_qualified(tool, server)
    attributes: dict[str, str] = {"gen_ai.tool.name": tool, "gen_ai.operation.name": "execute_tool"}
    if server is not None:
        attributes["mcpq.server"] = server
    if queue is not None:
        attributes["messaging.destination.name"] = queue
    with tracing.tracer.start_as_current_span(
        f"submit {tool}",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        links=links,
        record_exception=False,  # a message may quote an argument
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except BaseException as exc:
            code = getattr(getattr(exc, "code", None), "value", None)
            span.set_attribute("error.type", code if isinstance(code, str) else type(exc).__qualname__)
            span.set_status(StatusCode.ERROR)
            raise


def split_qualified(tool: str, server: str | None) -> tuple[str, str | None]:
    """``server/tool`` -> (tool, server), the routing rule (MCP tool names cannot contain '/')."""
    if server is None and "/" in tool:
        prefix, _, name = tool.partition("/")
        if prefix and name:
            return name, prefix
    return tool, server


def note(key: str, value: str | int | float | bool) -> None:
    """Set one attribute on the current span when tracing is on (names and numbers only)."""
    if _active is None:
        return
    from opentelemetry import trace

    span: Span = trace.get_current_span()
    span.set_attribute(key, value)
