"""Traces without a broker or a worker: the on/off rule, nothing of
OpenTelemetry loaded when off, the producer's submit span and the context in
the message headers, the call span's attributes, the loop-thread hop, and a
chunk's calls each in a trace of its own linked to the chunk.

Spans go to the OTel SDK's in-memory exporter, through ``tracing.enable``
(the process-wide tracer provider is left alone)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from celery import Celery, signals
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mcpq.producer.queue import ToolQueue
from mcpq.producer.submission import prepare_call
from mcpq.worker import tracing as call_tracing
from mcpq.worker.contract import tracing
from mcpq.worker.contract.errors import InvalidArgumentsError, ToolExecutionError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.loop import LoopThread

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SECRET = "argument-value-never-an-attribute"


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.reset()
    assert tracing.enable(provider) is not None
    yield exporter
    tracing.reset()
    provider.shutdown()


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def ids(span: ReadableSpan) -> tuple[int, int]:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


# --------------------------------------------------------------------------- on or off


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": " None "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "app"}, False),  # not about traces
    ],
)
def test_the_rule(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


#: Run first in the subprocesses below: records which module imports any part
#: of the OpenTelemetry SDK, instrumentation or exporters (the first frame that
#: is neither the import machinery nor OpenTelemetry itself).
WHO_IMPORTS = """
import importlib.abc, sys
importers = set()
class Who(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.instrumentation", "opentelemetry.exporter")):
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "opentelemetry", "_frozen_importlib")
            ):
                frame = frame.f_back
            importers.add(frame.f_globals.get("__name__", "?") if frame is not None else "?")
        return None
sys.meta_path.insert(0, Who())
"""


def _run_without_otel_env(code: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", WHO_IMPORTS + code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _not_mcpq(importers: list[str]) -> list[str]:
    """Importers of the OTel SDK that are mcpq (there must be none). redis-py 8
    imports ``opentelemetry.sdk.metrics`` on ``import redis`` whenever the SDK is
    installed (its own optional metrics, redis/observability/providers.py)."""
    return [name for name in importers if name.startswith("mcpq") or name == "__main__"]


def test_off_the_producer_imports_no_opentelemetry_sdk_and_sends_no_trace() -> None:
    """``import mcpq.producer`` and a submit (to an in-memory broker) with the
    OTEL_* environment unset: mcpq imports nothing of OpenTelemetry's SDK, the
    message carries no trace header."""
    code = """
import json
import fakeredis
from celery import Celery, signals
import mcpq, mcpq.producer
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.settings import Settings
headers = []
def seen(**kw): headers.append(dict(kw.get("headers") or {}))
signals.before_task_publish.connect(seen, weak=False)
q = ToolQueue(Settings(), app=Celery(broker="memory://", backend="cache+memory://"))
q._redis = fakeredis.FakeRedis(decode_responses=True)
handle = q.submit("add", {"a": 1, "b": 2})
print(json.dumps({
    "importers": sorted(importers),
    "loaded": sorted(m for m in sys.modules if m.startswith((
        "opentelemetry.sdk.trace", "opentelemetry.propagate", "opentelemetry.instrumentation",
        "opentelemetry.exporter",
    ))),
    "traceparent": [h.get("traceparent") for h in headers],
    "id": handle.id,
}))
"""
    out = _run_without_otel_env(code)
    assert _not_mcpq(out["importers"]) == [], out["importers"]
    assert out["loaded"] == [], "tracing off: no tracer SDK, propagator, instrumentation or exporter"
    assert out["traceparent"] == [None]
    assert out["id"]


def test_off_the_worker_call_path_imports_no_opentelemetry_sdk() -> None:
    """The worker's span helpers with tracing off: ``NO_SPAN``, the function
    itself, no handoff; mcpq imports nothing of the SDK (the MCP SDK imports
    the OpenTelemetry API on its own)."""
    code = """
import json
import mcpq.worker.router, mcpq.worker.tasks
from mcpq.worker import tracing
from mcpq.worker.contract.result import ToolResult
tracing.queued(0.5)
with tracing.call_span("s/t", None, 1) as span:
    span.target("s", "stdio"); span.admission("allow"); span.session(object())
    span.finish(ToolResult.ok("t", "s", {}))
    handoff = tracing.handoff()
    with tracing.resumed(handoff, object()):
        pass
f = lambda: 1
print(json.dumps({
    "importers": sorted(importers),
    "trace_sdk": sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace",
                        "opentelemetry.instrumentation", "opentelemetry.exporter"))),
    "no_span": span is tracing.NO_SPAN, "handoff": handoff, "same_fn": tracing.chunk_call(f, {}) is f,
}))
"""
    out = _run_without_otel_env(code)
    assert _not_mcpq(out.pop("importers")) == []
    assert out == {"trace_sdk": [], "no_span": True, "handoff": None, "same_fn": True}


def test_asked_for_but_not_installed_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sdk(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    tracing.reset()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setattr(builtins, "__import__", no_sdk)
    try:
        assert tracing.active() is None
    finally:
        monkeypatch.undo()
        tracing.reset()


# --------------------------------------------------------------------------- the producer


def test_submit_span_names_the_call_and_the_message_carries_its_trace(spans: InMemorySpanExporter) -> None:
    sent: list[dict[str, Any]] = []

    def seen(headers: dict[str, Any] | None = None, **_: Any) -> None:
        sent.append(dict(headers or {}))

    signals.before_task_publish.connect(seen, weak=False)
    try:
        queue = ToolQueue(Settings(), app=Celery(broker="memory://", backend="cache+memory://"))
        queue._redis = fakeredis.FakeRedis(decode_responses=True)
        handle = queue.submit("srv/add", {"a": SECRET, "b": 2})
    finally:
        signals.before_task_publish.disconnect(seen)

    submit = finished(spans, "submit add")
    publish = finished(spans, "apply_async/mcpq.call_tool")
    assert dict(submit.attributes or {}) == {
        "gen_ai.tool.name": "add",
        "gen_ai.operation.name": "execute_tool",
        "mcpq.server": "srv",
        "messaging.destination.name": "mcpq",
        "mcpq.call_id": handle.id,
    }
    assert publish.parent is not None and publish.parent.span_id == ids(submit)[1]
    trace_id, span_id = ids(publish)
    assert sent[-1]["traceparent"].split("-")[:3] == ["00", f"{trace_id:032x}", f"{span_id:016x}"]
    for span in spans.get_finished_spans():
        assert SECRET not in json.dumps(dict(span.attributes or {}), default=str)


def test_a_refused_submit_ends_its_span_with_the_code_only(spans: InMemorySpanExporter) -> None:
    queue = ToolQueue(Settings(), app=Celery(broker="memory://", backend="cache+memory://"))
    with pytest.raises(InvalidArgumentsError):
        queue.submit("add", {"a": float("nan"), "b": SECRET}, timeout=-1)
    submit = finished(spans, "submit add")
    assert submit.status.status_code.name == "ERROR"
    assert submit.attributes is not None and submit.attributes["error.type"] == "invalid_arguments"
    assert not submit.events and not submit.status.description, "no message: it may quote an argument"


def test_prepared_calls_carry_the_submit_trace_only_when_asked(spans: InMemorySpanExporter) -> None:
    with tracing.submit_span("add", None, "q"):
        traced = prepare_call(Settings(), "add", {"a": 1}, traced=True)
        plain = prepare_call(Settings(), "add", {"a": 1})  # fan-out: traced per call, on the worker
    assert traced.trace is not None and "traceparent" in traced.trace
    assert traced.chunk_entry()["trace"] == traced.trace
    assert plain.trace is None and "trace" not in plain.chunk_entry()
    trace_id, span_id = ids(finished(spans, "submit add"))
    assert traced.trace["traceparent"].split("-")[1:3] == [f"{trace_id:032x}", f"{span_id:016x}"]


def test_a_carrier_makes_another_threads_publish_a_child_of_the_submit(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test", tracer_provider=tracing.active().provider)  # type: ignore[union-attr]
    with tracing.submit_span("add", None, "q"):
        carried = tracing.carrier()

    def publish() -> None:
        with tracing.attached(carried), tracer.start_as_current_span("publish"):
            pass

    worker = threading.Thread(target=publish)
    worker.start()
    worker.join()
    submit, published = finished(spans, "submit add"), finished(spans, "publish")
    assert published.parent is not None and published.parent.span_id == ids(submit)[1]


@pytest.mark.parametrize(
    "value",
    [
        None,
        "00-abc",
        [],
        {},
        {"traceparent": 5},
        {"k" * 65: "v"},
        {"traceparent": "x" * 2000},
        {str(i): "v" for i in range(9)},
    ],
)
def test_a_malformed_carrier_is_ignored(value: Any) -> None:
    assert tracing.checked_carrier(value) is None


# --------------------------------------------------------------------------- the worker


class FakeClient:
    protocol_version = "2025-11-25"


def test_call_span_attributes_follow_the_mcp_conventions(spans: InMemorySpanExporter) -> None:
    call_tracing.queued(0.25)
    with call_tracing.call_span("srv/get-sum", None, 2) as span:
        span.target("srv", "streamable-http")
        span.admission("probe")
        span.session(FakeClient())
        failed = ToolResult.failure("get-sum", ToolExecutionError(f"tool said {SECRET}"), server_name="srv")
        span.finish(failed)
    with call_tracing.call_span("plain", "local", 1) as span:
        span.target("local", "stdio")
        span.finish(ToolResult.ok("plain", "local", {"content": [{"type": "text", "text": SECRET}]}))

    call = finished(spans, "execute_tool get-sum")
    assert call.kind is trace.SpanKind.INTERNAL
    assert dict(call.attributes or {}) == {
        "mcp.method.name": "tools/call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get-sum",
        "mcpq.attempt": 2,
        "mcpq.server": "srv",
        "mcpq.queue_wait_ms": 250.0,
        "network.transport": "tcp",
        "mcpq.breaker.decision": "probe",
        "mcp.protocol.version": "2025-11-25",
        "error.type": "tool_error",
        "mcpq.error_code": "tool_error",
    }
    assert call.status.status_code.name == "ERROR" and call.status.description == "tool_error"
    plain = finished(spans, "execute_tool plain")
    attributes = dict(plain.attributes or {})
    assert attributes["network.transport"] == "pipe" and "mcpq.queue_wait_ms" not in attributes
    assert "error.type" not in attributes and plain.status.status_code.name == "UNSET"
    for s in spans.get_finished_spans():
        assert SECRET not in json.dumps(dict(s.attributes or {})) + str(s.status.description)


def test_the_call_span_is_the_parent_on_the_loop_thread_even_without_inherited_context(
    spans: InMemorySpanExporter,
) -> None:
    """The request runs on the loop thread. ``resumed`` makes the call span
    current there explicitly: a coroutine started in an empty context (nothing
    inherited from the task thread) still makes its span a child of the call."""
    provider = tracing.active().provider  # type: ignore[union-attr]
    tracer = trace.get_tracer("sdk-stand-in", tracer_provider=provider)
    loop = LoopThread("test-loop")
    try:
        with call_tracing.call_span("t", "s", 1):
            hand = call_tracing.handoff()
            assert hand is not None

            async def request(explicit: bool) -> None:
                with (
                    call_tracing.resumed(hand if explicit else None, FakeClient()),
                    tracer.start_as_current_span("explicit" if explicit else "orphan"),
                ):
                    await asyncio.sleep(0)

            for explicit in (True, False):
                done = threading.Event()
                loop.loop.call_soon_threadsafe(
                    lambda e=explicit, d=done: asyncio.ensure_future(request(e)).add_done_callback(
                        lambda _: d.set()
                    ),
                    context=contextvars.Context(),  # what the loop thread knows of the caller: nothing
                )
                assert done.wait(10)
            # The pool's own path (run_coroutine_threadsafe) keeps the context as well.
            loop.run(request(True), timeout=10)
    finally:
        loop.stop()
    call_ids = ids(finished(spans, "execute_tool t"))
    explicit_spans = [s for s in spans.get_finished_spans() if s.name == "explicit"]
    assert len(explicit_spans) == 2
    assert all(s.parent is not None and s.parent.span_id == call_ids[1] for s in explicit_spans)
    assert all(ids(s)[0] == call_ids[0] for s in explicit_spans)
    assert finished(spans, "orphan").parent is None, "without the handoff the hop loses the trace"
    call = finished(spans, "execute_tool t")
    assert call.attributes is not None and call.attributes["mcp.protocol.version"] == "2025-11-25"


def test_chunk_calls_are_traces_of_their_own_linked_to_the_chunk(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test", tracer_provider=tracing.active().provider)  # type: ignore[union-attr]
    with tracing.submit_span("t", "s", "q"):
        carried = tracing.carrier()

    def one_call(name: str) -> str:
        with call_tracing.call_span(name, "s", 1):
            return name

    pool = ThreadPoolExecutor(2)
    try:
        with tracer.start_as_current_span("run/mcpq.call_chunk"):
            entries = [
                {"id": "1", "tool": "t"},
                {"id": "2", "tool": "t", "enqueued_at": 1.0},
                {"id": "3", "tool": "t", "trace": carried},
                {"id": "4", "tool": "t", "trace": {"traceparent": "junk"}},
            ]
            futures = [pool.submit(call_tracing.chunk_call(one_call, e), f"call{e['id']}") for e in entries]
            assert [f.result() for f in futures] == ["call1", "call2", "call3", "call4"]
    finally:
        pool.shutdown()
    chunk_trace, chunk_span = ids(finished(spans, "run/mcpq.call_chunk"))
    submit_trace, submit_span = ids(finished(spans, "submit t"))
    calls = {name: finished(spans, f"execute_tool {name}") for name in ("call1", "call2", "call3", "call4")}
    for span in calls.values():
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
            (chunk_trace, chunk_span)
        ]
        assert dict(span.links[0].attributes or {}) == {"mcpq.link": "chunk"}
    own = [calls["call1"], calls["call2"], calls["call4"]]
    assert all(s.parent is None for s in own), "a fan-out call starts its own trace"
    assert len({ids(s)[0] for s in own} | {chunk_trace}) == 4
    assert calls["call3"].parent is not None and calls["call3"].parent.span_id == submit_span
    assert ids(calls["call3"])[0] == submit_trace
    assert (calls["call2"].attributes or {})["mcpq.queue_wait_ms"] > 0
    assert "mcpq.queue_wait_ms" not in (calls["call1"].attributes or {})
