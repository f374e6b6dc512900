"""Calls/s with metrics and traces on against off, in one run, on the same fan-out.

    python -m bench.observability [--calls 5000] [--rounds 3] [--on both|metrics|traces|none]
                                  [--sample RATIO] [--json FILE]

Two workers (threads, 16 each) on two queues of one private redis-server, each with
the stdio demo server: ``off`` with the defaults, ``on`` with ``MCPQ_METRICS_PORT``
and traces exported over OTLP/HTTP (``OTEL_TRACES_EXPORTER=otlp``, the SDK's batch span
processor with its defaults) to a sink in this process that answers 200 and counts the
requests, bytes and spans it received (a collector's cost is not the worker's, but the
worker's protobuf encoding and HTTP posts are). Rounds alternate off / on:
``ToolQueue.map`` of ``--calls`` echo calls, every result checked. The producer's own
tracing stays off in both (it is decided once per process): what is measured is the
worker's cost, where the per-call spans and metrics are. The sink's CPU is this
process's, shared by both rounds. Target: on / off >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.environment import (
    bench_env,
    child_env,
    free_port,
    git_state,
    load_mcpq,
    machine_info,
    stdio_server,
    write_config,
)
from bench.harness import WorkerProcess, no_backend_retries, start_redis, wait_for_worker
from bench.runner import add_json_option, run_and_report
from bench.stats import summarize

SERVER = "bench-stdio"
CALL_TIMEOUT = 120.0
WORKER_CONCURRENCY = 16
TARGET = 0.95


class SpanSink:
    """An OTLP/HTTP endpoint that accepts every export and counts requests, bytes and spans."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.spans = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(size)
                spans = _span_count(body, self.headers.get("Content-Encoding", ""))
                with sink._lock:
                    sink.requests += 1
                    sink.bytes += size
                    sink.spans += spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, name="span-sink", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _span_count(body: bytes, encoding: str) -> int:
    """Spans in one OTLP/HTTP protobuf export (evidence that every call was traced)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if encoding.strip().lower() == "gzip":
        body = gzip.decompress(body)
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {"calls": args.calls, "rounds": args.rounds, "machine": machine_info()}
    report["git"] = git_state()
    with contextlib.ExitStack() as stack:
        redis_port = free_port()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-bench-")))
        config_path = workdir / "servers.yaml"
        write_config(config_path, {SERVER: stdio_server()})
        env = bench_env(f"redis://127.0.0.1:{redis_port}", config_path, tag)
        app, settings = load_mcpq(env, "bench.observability")
        from mcpq.producer.queue import ToolQueue

        start_redis(stack, redis_port)
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        stack.callback(no_backend_retries, app)
        sink = SpanSink()
        stack.callback(sink.close)
        metrics_port = free_port()
        on_env: dict[str, str] = {}
        if args.on in ("both", "metrics"):
            on_env["MCPQ_METRICS_PORT"] = str(metrics_port)
        if args.on in ("both", "traces"):
            on_env.update(
                OTEL_TRACES_EXPORTER="otlp",
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=sink.url,
                OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
                OTEL_SERVICE_NAME="mcpq-bench-worker",
            )
            if args.sample is not None:  # the head sampling docs/observability.md suggests
                on_env.update(
                    OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(args.sample)
                )
        report["sample"] = args.sample
        report["on"] = args.on
        queues = {"off": f"{settings.queue}-off", "on": f"{settings.queue}-on"}
        workers = {
            "off": WorkerProcess(child_env(), queues["off"], WORKER_CONCURRENCY, node=f"off-{tag}"),
            "on": WorkerProcess(child_env(on_env), queues["on"], WORKER_CONCURRENCY, node=f"on-{tag}"),
        }
        for worker in workers.values():
            stack.callback(worker.stop)
            worker.start()
        for worker in workers.values():
            wait_for_worker(app, worker)
        print("workers up", file=sys.stderr)

        arguments = [{"text": f"t{i}"} for i in range(args.calls)]
        rates: dict[str, list[float]] = {"off": [], "on": []}
        wrong = 0
        for mode in ("off", "on"):  # warm both: sessions, schema caches, exporters
            tq.map("echo", arguments[:200], server=SERVER, timeout=CALL_TIMEOUT, queue=queues[mode])
        for i in range(args.rounds):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                print(f"round {i + 1}/{args.rounds}: {mode}", file=sys.stderr)
                started = time.perf_counter()
                results = tq.map("echo", arguments, server=SERVER, timeout=CALL_TIMEOUT, queue=queues[mode])
                rates[mode].append(args.calls / (time.perf_counter() - started))
                wrong += sum(1 for r, a in zip(results, arguments, strict=True) if r.text != a["text"])
        scraped = ""
        if "MCPQ_METRICS_PORT" in on_env:
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        report["throughput"] = {
            "off_calls_per_s": rates["off"],
            "on_calls_per_s": rates["on"],
            "ratio_on_over_off": summarize(rates["on"])["median"] / summarize(rates["off"])["median"],
            "target": TARGET,
            "wrong_results": wrong,
        }
        # Evidence that "on" was on: spans reached the sink, the worker counts calls.
        deadline = time.monotonic() + 15  # the batch span processor exports every 5 s
        while "OTEL_TRACES_EXPORTER" in on_env and sink.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        report["evidence"] = {
            "otlp_exports": sink.requests,
            "otlp_bytes": sink.bytes,
            "otlp_spans": sink.spans,
            "metrics_has_calls_total": "mcpq_calls_total{" in scraped,
        }
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


def render(report: dict[str, Any]) -> str:
    t, e = report["throughput"], report["evidence"]
    off, on = summarize(t["off_calls_per_s"])["median"], summarize(t["on_calls_per_s"])["median"]
    return "\n".join(
        [
            f"bench.observability  ({report['calls']} calls x {report['rounds']} rounds;"
            f" git {report['git']})",
            "",
            "fan-out throughput, calls/s (rounds; median)",
            f"  off (defaults)                 {', '.join(f'{r:.0f}' for r in t['off_calls_per_s'])};"
            f" {off:.0f}",
            f"  on  ({_mode(report):<24}) {', '.join(f'{r:.0f}' for r in t['on_calls_per_s'])}; {on:.0f}",
            f"  ratio on / off                 {t['ratio_on_over_off']:.3f} (target >= {t['target']})",
            f"  wrong results                  {t['wrong_results']}",
            "",
            f"evidence: {e['otlp_exports']} OTLP exports ({e['otlp_bytes'] / 1e6:.1f} MB,"
            f" {e['otlp_spans']} spans) received, /metrics has mcpq_calls_total:"
            f" {e['metrics_has_calls_total']}",
            f"load average: {_loadavg(report['machine'].get('loadavg_start'))} at the start,"
            f" {_loadavg(report['machine'].get('loadavg_end'))} at the end",
        ]
    )


def _mode(report: dict[str, Any]) -> str:
    sample = report.get("sample")
    return str(report["on"]) if sample is None else f"{report['on']}, sampled {sample:g}"


def _loadavg(value: Any) -> str:
    return " ".join(f"{x:.2f}" for x in value) if value else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.observability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=5000, help="calls per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    parser.add_argument(
        "--on",
        choices=["both", "metrics", "traces", "none"],
        default="both",
        help="what the 'on' worker turns on (default both; none: an A/A control)",
    )
    parser.add_argument(
        "--sample",
        type=float,
        default=None,
        metavar="RATIO",
        help="traces: sample this ratio of the calls (parentbased_traceidratio; default: all)",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 1 if report["throughput"]["wrong_results"] else 0


if __name__ == "__main__":
    sys.exit(main())
