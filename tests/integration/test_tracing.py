"""Traces end to end against real parts: a private redis-server, a real Celery
worker exporting OTLP over HTTP to a small receiver in this test, the test MCP
server over stdio and Streamable HTTP (its ``trace_meta`` tool answers with the
``traceparent`` it received in ``params._meta``), and the producer in this
process exporting to the OTel SDK's in-memory exporter.

One trace from the producer's submit span, through Celery's publish and run
spans and the worker's call span, to the SDK's request span whose id the
server received; a fan-out's calls each a trace of their own, linked to their
chunk; no argument or result value in any attribute; off by default.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mcpq import AsyncToolQueue, ToolResult
from mcpq.producer.calls import Call
from mcpq.producer.publish_policy import PUBLISH_RETRY
from mcpq.producer.sending import plan_chunks, send_chunks
from mcpq.producer.submission import prepare_call
from mcpq.worker.contract import tracing
from tests.support.procs import start_test_server
from tests.support.stack import TINY_BUDGETS, Stack, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Appears in arguments and in a tool's output: must never be an attribute.
SECRET = "argument-value-never-an-attribute"
SPAN_WAIT = 30.0


# --------------------------------------------------------------------------- spans, from both ends


@dataclass(frozen=True)
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    status: str = "UNSET"
    status_message: str = ""
    event_texts: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every string this span would show a backend, but its name."""
        out = [str(v) for v in self.attributes.values()] + [self.status_message, *self.event_texts]
        out += [str(v) for _, _, attrs in self.links for v in attrs.values()]
        return out


def from_sdk(span: ReadableSpan) -> Span:
    ctx = span.get_span_context()
    assert ctx is not None
    return Span(
        name=span.name,
        kind=span.kind.name,
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{span.parent.span_id:016x}" if span.parent else None,
        attributes=dict(span.attributes or {}),
        links=[
            (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}", dict(link.attributes or {}))
            for link in span.links
        ],
        status=span.status.status_code.name,
        status_message=span.status.description or "",
        event_texts=[f"{e.name} {dict(e.attributes or {})}" for e in span.events],
    )


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, which) if which else None


def _attrs(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


class Collector:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) on a free port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.services: set[str] = set()
        self._changed = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans: list[Span] = []
        services: set[str] = set()
        for resource_spans in request.resource_spans:
            services.add(str(_attrs(resource_spans.resource.attributes).get("service.name")))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            kind=_KINDS[s.kind],
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex() or None,
                            attributes=_attrs(s.attributes),
                            links=[
                                (x.trace_id.hex(), x.span_id.hex(), _attrs(x.attributes)) for x in s.links
                            ],
                            status=_STATUS[s.status.code],
                            status_message=s.status.message,
                            event_texts=[f"{e.name} {_attrs(e.attributes)}" for e in s.events],
                        )
                    )
        with self._changed:
            self.spans.extend(spans)
            self.services |= services
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout: float = SPAN_WAIT) -> list[Span]:
        """The spans received, once ``predicate`` holds for them (woken by each export)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.spans), timeout):
                names = sorted(s.name for s in self.spans)
                raise AssertionError(f"spans not received within {timeout}s; have {names}")
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.fixture()
def producer_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (the producer), spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.reset()
    tracing.enable(provider)
    yield exporter
    tracing.reset()
    provider.shutdown()


def worker_env(collector: Collector) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans arrive while the test waits on them
        "OTEL_SERVICE_NAME": "mcpq-worker-under-test",
    }


def trace_of(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a W3C ``traceparent``."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} spans match {match}: {[(s.name, s.trace_id) for s in spans]}"
    return found[0]


def assert_no_secret(spans: list[Span]) -> None:
    leaks = [(s.name, text) for s in spans for text in s.texts() if SECRET in text]
    assert leaks == [], f"argument or result values in span attributes: {leaks}"


# --------------------------------------------------------------------------- tests


def test_one_trace_from_submit_to_the_server(
    make_stack: Callable[..., Any],
    count_dir: Path,
    collector: Collector,
    producer_spans: InMemorySpanExporter,
) -> None:
    with start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as web:
        stack: Stack = make_stack(
            {"local": stdio_server(count_dir, retry_attempts=0), "web": {"url": web.url, "retry_attempts": 0}}
        )
        stack.start_worker(concurrency=4, **worker_env(collector))

        # The sync face over stdio.
        sync_result = stack.queue.call("local/trace_meta", {"text": SECRET}, wait=60)

        # The asyncio face (its publisher thread) over Streamable HTTP.
        async def async_call() -> ToolResult:
            async with AsyncToolQueue(stack.settings) as q:
                return await q.call("web/trace_meta", {"text": SECRET}, wait=60)

        async_result = asyncio.run(async_call())
        # A tool error: the output quotes the argument.
        failed = stack.queue.call("local/fail", {"message": SECRET}, wait=60)

    assert sync_result.success and async_result.success, (sync_result, async_result)
    assert failed.error_code == "tool_error"
    mine = [from_sdk(s) for s in producer_spans.get_finished_spans()]

    for result, server, transport in ((sync_result, "local", "pipe"), (async_result, "web", "tcp")):
        submit = one(
            [s for s in mine if s.attributes.get("mcpq.call_id") == result.request_id],
            name="submit trace_meta",
        )
        assert submit.attributes["gen_ai.tool.name"] == "trace_meta"
        assert submit.attributes["mcpq.server"] == server
        publish = one(mine, name="apply_async/mcpq.call_tool", trace_id=submit.trace_id)
        assert publish.parent_id == submit.span_id and publish.kind == "PRODUCER"

        traceparent = result.structured["traceparent"]
        trace_id, sent_span = trace_of(traceparent)
        assert trace_id == submit.trace_id, "the server's traceparent is not the producer's trace"

        spans = collector.wait_for(
            lambda got, t=trace_id: (
                any(s.name.startswith("MCP send tools/call") and s.trace_id == t for s in got)
                and any(s.name == "run/mcpq.call_tool" and s.trace_id == t for s in got)
            )
        )
        run = one(spans, name="run/mcpq.call_tool", trace_id=trace_id)
        assert run.parent_id == publish.span_id and run.kind == "CONSUMER"
        call = one(spans, name="execute_tool trace_meta", trace_id=trace_id)
        assert call.parent_id == run.span_id and call.kind == "INTERNAL"
        request = one(spans, name="MCP send tools/call trace_meta", trace_id=trace_id)
        assert request.parent_id == call.span_id and request.kind == "CLIENT"
        assert request.span_id == sent_span, "the server got another span's id than the SDK's request span"

        attrs = call.attributes
        assert {k: attrs[k] for k in ("mcp.method.name", "gen_ai.operation.name", "gen_ai.tool.name")} == {
            "mcp.method.name": "tools/call",
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "trace_meta",
        }
        assert attrs["mcpq.server"] == server
        assert attrs["network.transport"] == transport
        assert attrs["mcpq.attempt"] == 1
        assert attrs["mcpq.breaker.decision"] == "allow"
        assert isinstance(attrs["mcp.protocol.version"], str) and attrs["mcp.protocol.version"]
        assert attrs["mcpq.queue_wait_ms"] >= 0
        assert "error.type" not in attrs and call.status != "ERROR"

    failed_call = one(
        collector.wait_for(lambda got: any(s.name == "execute_tool fail" for s in got)),
        name="execute_tool fail",
    )
    assert failed_call.attributes["error.type"] == "tool_error"
    assert failed_call.attributes["mcpq.error_code"] == "tool_error"
    assert failed_call.status == "ERROR" and failed_call.status_message == "tool_error"

    assert_no_secret(mine)
    assert_no_secret(collector.spans)
    assert "mcpq-worker-under-test" in collector.services


def test_fan_out_calls_are_traces_of_their_own_linked_to_their_chunk(
    make_stack: Callable[..., Any],
    count_dir: Path,
    collector: Collector,
    producer_spans: InMemorySpanExporter,
) -> None:
    stack: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0)})
    stack.start_worker(concurrency=4, **worker_env(collector))
    batch_tracer = tracing.active()
    assert batch_tracer is not None
    with batch_tracer.tracer.start_as_current_span("the app's batch") as batch_span:
        results = stack.queue.map(
            "local/trace_meta", [{"text": f"{SECRET}-{i}"} for i in range(4)], chunk_size=2
        )
    batch_trace = f"{batch_span.get_span_context().trace_id:032x}"
    assert all(r.success for r in results), results
    received = [trace_of(r.structured["traceparent"]) for r in results]
    assert len({t for t, _ in received}) == 4, "a fan-out's calls must not share one trace"
    assert batch_trace not in {t for t, _ in received}

    # A chunk's run span ends after its calls' spans and may come in a later export.
    spans = collector.wait_for(
        lambda got: (
            sum(s.name == "execute_tool trace_meta" for s in got) >= 4
            and sum(s.name == "run/mcpq.call_chunk" for s in got) >= 2
        )
    )
    runs = {s.span_id: s for s in spans if s.name == "run/mcpq.call_chunk"}
    assert len(runs) == 2 and all(r.trace_id == batch_trace for r in runs.values()), (
        "chunks in the batch's trace"
    )
    for trace_id, sent_span in received:
        call = one(spans, name="execute_tool trace_meta", trace_id=trace_id)
        assert call.parent_id is None, "a fan-out call's span starts its own trace"
        assert len(call.links) == 1, call.links
        linked_trace, linked_span, link_attributes = call.links[0]
        assert linked_trace == batch_trace and linked_span in runs, "linked to its chunk's run span"
        assert link_attributes == {"mcpq.link": "chunk"}
        assert call.attributes["mcpq.queue_wait_ms"] >= 0
        request = one(spans, name="MCP send tools/call trace_meta", trace_id=trace_id)
        assert request.parent_id == call.span_id and request.span_id == sent_span

    # Chunk entries that carry their submit's trace (the asyncio face's rounds):
    # each call continues its own submit span, still linked to the chunk.
    submits = []
    calls = []
    for _ in range(2):
        with tracing.submit_span("trace_meta", "local", stack.settings.queue):
            prepared = prepare_call(stack.settings, "local/trace_meta", {"text": SECRET}, traced=True)
        submits.append(prepared.trace)
        calls.append(prepared)
    chunks = plan_chunks([(c.chunk_entry(), c.label) for c in calls], 2)
    assert all("trace" in entry for entry in chunks[0].calls)
    send_chunks(stack.queue.app, chunks, stack.settings.queue, PUBLISH_RETRY)
    for prepared, carried in zip(calls, submits, strict=True):
        raw = AsyncResult(prepared.task_id, app=stack.queue.app).get(timeout=60)
        result = ToolResult.from_dict(raw)
        assert carried is not None
        submit_trace, submit_span_id = trace_of(carried["traceparent"])
        assert trace_of(result.structured["traceparent"])[0] == submit_trace
        spans = collector.wait_for(
            lambda got, t=submit_trace: any(
                s.name == "execute_tool trace_meta" and s.trace_id == t for s in got
            )
        )
        call = one(spans, name="execute_tool trace_meta", trace_id=submit_trace)
        assert call.parent_id == submit_span_id
        assert len(call.links) == 1 and call.links[0][2] == {"mcpq.link": "chunk"}

    assert_no_secret([from_sdk(s) for s in producer_spans.get_finished_spans()])
    assert_no_secret(collector.spans)


def test_chunk_size_one_calls_are_traces_of_their_own_linked_to_the_batch(
    make_stack: Callable[..., Any],
    count_dir: Path,
    collector: Collector,
    producer_spans: InMemorySpanExporter,
) -> None:
    """chunk_size=1 sends one mcpq.call_tool per call: each is still a trace of
    its own (its submit span, linked to the batch), not a child of the batch's."""
    stack: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0)})
    stack.start_worker(concurrency=4, **worker_env(collector))
    batch_tracer = tracing.active()
    assert batch_tracer is not None
    with batch_tracer.tracer.start_as_current_span("the app's batch") as batch_span:
        handle = stack.queue.submit_many(
            [Call("local/trace_meta", {"text": f"{SECRET}-{i}"}) for i in range(3)], chunk_size=1
        )
        results = handle.results()
    batch = batch_span.get_span_context()
    batch_trace, batch_span_id = f"{batch.trace_id:032x}", f"{batch.span_id:016x}"
    assert all(r.success for r in results), results
    assert len(handle.group_ids) == 1, "still published as one group"
    received = [trace_of(r.structured["traceparent"]) for r in results]
    assert len({t for t, _ in received}) == 3 and batch_trace not in {t for t, _ in received}
    mine = [from_sdk(s) for s in producer_spans.get_finished_spans()]
    spans = collector.wait_for(
        lambda got: sum(s.name == "run/mcpq.call_tool" and s.trace_id != batch_trace for s in got) >= 3
    )
    for trace_id, sent_span in received:
        submit = one(mine, name="submit trace_meta", trace_id=trace_id)
        assert submit.parent_id is None, "a call's own trace, not the batch's"
        assert submit.links == [(batch_trace, batch_span_id, {"mcpq.link": "batch"})]
        publish = one(mine, name="apply_async/mcpq.call_tool", trace_id=trace_id)
        assert publish.parent_id == submit.span_id
        run = one(spans, name="run/mcpq.call_tool", trace_id=trace_id)
        call = one(spans, name="execute_tool trace_meta", trace_id=trace_id)
        request = one(spans, name="MCP send tools/call trace_meta", trace_id=trace_id)
        assert run.parent_id == publish.span_id and call.parent_id == run.span_id
        assert request.parent_id == call.span_id and request.span_id == sent_span
    assert_no_secret(mine)
    assert_no_secret(collector.spans)


def test_prefork_children_trace_too(
    make_stack: Callable[..., Any],
    count_dir: Path,
    collector: Collector,
    producer_spans: InMemorySpanExporter,
) -> None:
    """Under prefork the children set tracing up (worker_process_init), never the parent."""
    stack: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0)})
    stack.start_worker(pool="processes", concurrency=1, **worker_env(collector))
    result = stack.queue.call("local/trace_meta", {"text": SECRET}, wait=60)
    assert result.success, result
    trace_id, sent_span = trace_of(result.structured["traceparent"])
    mine = [from_sdk(s) for s in producer_spans.get_finished_spans()]
    submit = one(
        [s for s in mine if s.attributes.get("mcpq.call_id") == result.request_id], name="submit trace_meta"
    )
    assert submit.trace_id == trace_id
    # The run span ends last (after the call's own spans): once it is in, all are.
    spans = collector.wait_for(
        lambda got: any(s.name == "run/mcpq.call_tool" and s.trace_id == trace_id for s in got)
    )
    call = one(spans, name="execute_tool trace_meta", trace_id=trace_id)
    run = one(spans, name="run/mcpq.call_tool", trace_id=trace_id)
    request = one(spans, name="MCP send tools/call trace_meta", trace_id=trace_id)
    assert (
        call.parent_id == run.span_id and request.parent_id == call.span_id and request.span_id == sent_span
    )
    assert_no_secret(collector.spans)


def test_a_call_the_ledger_republishes_stays_in_its_trace(
    make_stack: Callable[..., Any],
    count_dir: Path,
    collector: Collector,
    producer_spans: InMemorySpanExporter,
    redis_url: str,
) -> None:
    """The broker loses a call; the worker's sweeper publishes it again from the
    ledger, whose entry carries the submit span's context: one trace still."""
    # Budgets small enough for the ledger to republish within the test (grace:
    # 2 x visibility + hard limit + restore interval = 29.5 s), with room for a
    # stdio server that starts slowly on a loaded machine (as test_chunks).
    budgets = {
        **TINY_BUDGETS,
        "MCPQ_SOFT_TIME_LIMIT": "8",
        "MCPQ_TIME_LIMIT": "9",
        "MCPQ_VISIBILITY_TIMEOUT": "10",
    }
    stack: Stack = make_stack(
        {"local": stdio_server(count_dir, retry_attempts=0, timeout=1, connect_timeout=6)}, env=budgets
    )
    handle = stack.queue.submit("local/trace_meta", {"text": SECRET})
    broker = redis.Redis.from_url(f"{redis_url}/0")
    assert broker.delete(stack.settings.queue) == 1  # lost, as with a worker SIGKILLed right after BRPOP
    stack.start_worker(concurrency=2, **worker_env(collector))
    result = handle.result(120)  # after the ledger's grace
    assert result.success, result
    mine = [from_sdk(s) for s in producer_spans.get_finished_spans()]
    submit = one([s for s in mine if s.attributes.get("mcpq.call_id") == handle.id], name="submit trace_meta")
    trace_id, _ = trace_of(result.structured["traceparent"])
    assert trace_id == submit.trace_id, "the republished call started a trace of its own"
    spans = collector.wait_for(
        lambda got: any(s.name == "run/mcpq.call_tool" and s.trace_id == trace_id for s in got)
    )
    assert one(spans, name="execute_tool trace_meta", trace_id=trace_id).attributes["mcpq.attempt"] == 1


def test_off_unless_asked_calls_unchanged(
    make_stack: Callable[..., Any], count_dir: Path, collector: Collector
) -> None:
    """An endpoint alone with ``OTEL_TRACES_EXPORTER=none`` is off too: nothing
    reaches the collector, nothing reaches the server, results are as always."""
    tracing.reset()  # this process decides again, from its OTEL-free environment
    stack: Stack = make_stack({"local": stdio_server(count_dir, retry_attempts=0)})
    worker = stack.start_worker(
        concurrency=2, OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector.endpoint
    )
    result = stack.queue.call("local/trace_meta", {"text": "x"}, wait=60)
    echoed = stack.queue.call("local/echo", {"text": "unchanged"}, wait=60)
    assert tracing.active() is None
    assert result.success and result.structured == {}, "no trace context goes to the server when off"
    assert echoed.success and echoed.structured == {"result": "unchanged"}
    worker.stop()  # a worker that traced would have exported by the end of its shutdown
    assert collector.spans == []
