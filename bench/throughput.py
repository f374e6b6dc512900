"""Fan-out throughput: mcpq against hand-written baselines, all measured in one run.

    python -m bench.throughput [--calls 5000] [--tools stdio-echo,http-echo,sleep20]
                               [--paths floor,bare,...] [--workers 1] [--concurrency N]
                               [--cpc-calls 200] [--scaling] [--json FILE]

Each path is a fan-out of N calls, timed from the first publish to the last
result (calls/s), after a warm-up fan-out (``--warmup``, 200 calls) that opens
every session. Every result is checked (success and the expected text); failures
are counted per path and printed.

Paths (the Celery ones all go through the same worker, ``-A bench.baselines``:
mcpq's app plus the baseline tasks, threads pool at mcpq's default concurrency):

- ``floor``: no-op Celery tasks (``bench.noop``, returns a small dict), published
  as groups of 200, at most 2,000 outstanding, results pushed (as mcpq's fan-out).
- ``bare``: ``bench.bare_call``, the bare pipeline: a module-level SDK session per
  server on a module-level loop thread, no breaker, routing, validation or claims.
- ``connect_per_call``: ``bench.cpc_call``, open an SDK client, call, close, per task
  (``--cpc-calls``, 200 by default: over stdio it starts a server process per call).
- ``direct``: the same tool through one pooled SDK session in this process, no
  queue, ``--direct-concurrency`` (32) calls in flight.
- ``mcpq``: ``ToolQueue.map(tool, [args] * N, server=..., chunk_size=1)``: one
  ``mcpq.call_tool`` task per call.
- ``mcpq_chunked``: the same with ``chunk_size=None``: automatic chunking (calls
  packed into ``mcpq.call_chunk`` tasks where the checkout has them; the header
  says whether it does).
- ``bare_prefork`` (default for the sleep tool only): the bare pipeline on a
  second worker, ``-P prefork -c <cores>``, on its own queue.

Tools: ``stdio-echo`` and ``sleep20`` (``sleep`` with ms=20) on the stdio demo
server, ``http-echo`` on one Streamable HTTP demo server process started for the
run (``sleep20-http`` too, on request). Targets (from the issue), for a fan-out
as users run it (``map`` with the default chunking, ``mcpq_chunked``): >= 0.8 x bare,
>= 20 x connect_per_call, >= 1.5 x floor, and for the sleep tool >= 5 x
bare_prefork. The same ratios for one task per call (``mcpq``) are printed too.

``--scaling``: the sleep tool through mcpq (chunk_size=1) on one worker, then on
two (each ``-c --scaling-concurrency``, 4) on the same queue and Redis; prints the ratio.
Use ``--tools ''`` to run only that.

A private redis-server (``EmbeddedRedis``) carries broker (db 0), results (db 1)
and state (db 2). Every process started here (redis, workers and their servers,
the HTTP server, the direct clients' servers) is stopped on exit, error, Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from bench.cpu import CpuMeter, cpu_seconds
from bench.environment import (
    bench_env,
    child_env,
    free_port,
    git_state,
    load_mcpq,
    machine_info,
    stdio_params,
    stdio_server,
    write_config,
)
from bench.harness import (
    DemoServerProcess,
    DirectClient,
    WorkerProcess,
    is_demo_server,
    no_backend_retries,
    start_redis,
    terminate,
    wait_for_worker,
)
from bench.runner import add_json_option, run_and_report

if TYPE_CHECKING:
    from mcpq.producer.queue import ToolQueue

# Nothing from producer/ or worker/ (nor bench.app / bench.baselines, which import
# mcpq.worker.celery) is imported at module level (see bench/environment.py); the
# Celery app is built from MCPQ_* at import time, so ``run`` sets them first.

MCPQ_SERVER = {"stdio": "bench-stdio", "http": "bench-http"}
CHUNK = 200  # the baselines' fan-out publishes like mcpq's default: groups of 200...
WINDOW = 2000  # ...at most 2,000 outstanding
IDLE_SWEEP = 1.0  # read every outstanding result once when nothing arrived for this long
STALL = 180.0  # give up on results that have not come after this long without progress
CHUNK_TASK = "mcpq.call_chunk"


@dataclass(frozen=True)
class ToolSpec:
    name: str
    kind: str  # stdio | http
    tool: str
    arguments: dict[str, Any]
    expected: str
    io_bound: bool = False

    @property
    def server(self) -> str:
        return MCPQ_SERVER[self.kind]


TOOLS = {
    "stdio-echo": ToolSpec("stdio-echo", "stdio", "echo", {"text": "x"}, "x"),
    "http-echo": ToolSpec("http-echo", "http", "echo", {"text": "x"}, "x"),
    "sleep20": ToolSpec("sleep20", "stdio", "sleep", {"ms": 20}, "slept 20 ms", io_bound=True),
    "sleep20-http": ToolSpec("sleep20-http", "http", "sleep", {"ms": 20}, "slept 20 ms", io_bound=True),
}
DEFAULT_TOOLS = ("stdio-echo", "http-echo", "sleep20")
# Order of measurement within a tool: the paths the targets compare sit next to each other.
PATHS = ("floor", "bare", "mcpq", "mcpq_chunked", "direct", "connect_per_call", "bare_prefork")
DEFAULT_PATHS = ("floor", "bare", "mcpq", "mcpq_chunked", "direct", "connect_per_call")
IO_BOUND_PATHS = ("bare_prefork",)
# (numerator, denominator, target, io-bound tools only). A fan-out through mcpq
# is ``map`` as users call it: chunk_size=None, the default (mcpq_chunked).
TARGETS: list[tuple[str, str, float, bool]] = [
    ("mcpq_chunked", "bare", 0.8, False),
    ("mcpq_chunked", "connect_per_call", 20.0, False),
    ("mcpq_chunked", "floor", 1.5, False),
    ("mcpq_chunked", "bare_prefork", 5.0, True),
]
# One task per call (chunk_size=1), for comparison.
INFO_RATIOS = [
    ("mcpq", "bare"),
    ("mcpq", "connect_per_call"),
    ("mcpq", "bare_prefork"),
    ("bare", "floor"),
    ("mcpq", "floor"),
    ("bare", "bare_prefork"),
]
LABELS = {
    "floor": "Celery floor: no-op tasks",
    "bare": "bare pipeline (module-level session)",
    "mcpq": "mcpq map, chunk_size=1",
    "mcpq_chunked": "mcpq map, chunk_size=None",
    "direct": "direct: pooled SDK session, no queue",
    "connect_per_call": "connect-per-call pipeline",
    "bare_prefork": "bare pipeline, prefork -c cores",
}
CPU_CATEGORIES = ("bench", "workers", "stdio servers", "http server", "redis")


# -- processes ------------------------------------------------------------------------------


class BenchWorker(WorkerProcess):
    """A worker on ``bench.baselines`` (mcpq's app plus the baseline tasks) under its own
    node name, so several can share a queue."""

    def __init__(self, env: dict[str, str], queue: str, concurrency: int, pool: str, node: str) -> None:
        """As ``WorkerProcess``; ``node``: its name before the ``@host``, unique in the run."""
        super().__init__(env, queue, concurrency, pool, app="bench.baselines", node=node)


class Fleet:
    """The workers of this run; stopping one also ends the stdio servers it started
    (the SDK starts them in sessions of their own, out of reach of the worker's group)."""

    def __init__(self) -> None:
        self.workers: list[BenchWorker] = []

    def start(self, app: Any, workers: list[BenchWorker]) -> None:
        for worker in workers:
            self.workers.append(worker)
            worker.start()
        for worker in workers:
            wait_for_worker(app, worker)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive()]

    def stop(self, workers: list[BenchWorker] | None = None) -> None:
        chosen = list(self.workers if workers is None else workers)
        servers: list[psutil.Process] = []
        for worker in chosen:
            if worker.alive():
                with contextlib.suppress(psutil.Error):
                    servers += [
                        p for p in psutil.Process(worker.pid).children(recursive=True) if is_demo_server(p)
                    ]
        for worker in chosen:
            worker.stop()
            if worker in self.workers:
                self.workers.remove(worker)
        terminate(servers)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds of the workers alive now, their trees walked anew: their stdio servers
        count as servers, with the CPU of children they already reaped (connect-per-call's
        short-lived servers show up there)."""
        out = {"workers": 0.0, "stdio servers": 0.0}
        for root in self.pids():
            try:
                procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    if is_demo_server(proc):
                        out["stdio servers"] += t.user + t.system + t.children_user + t.children_system
                    else:
                        out["workers"] += t.user + t.system
                        out["stdio servers"] += t.children_user + t.children_system
        return out


class DirectPool(DirectClient):
    """The direct client, on any server kind, with a concurrent fan-out."""

    def __init__(self, kind: str, target: Any) -> None:
        """``kind``: ``stdio`` or ``http``; ``target``: what ``mcp.Client`` connects to."""
        super().__init__(target)
        self.kind = kind

    async def _fan_out(self, spec: ToolSpec, n: int, concurrency: int) -> tuple[float, list[str]]:
        client = self.client
        assert client is not None
        gate = asyncio.Semaphore(concurrency)

        async def one() -> str | None:
            async with gate:
                try:
                    result = await client.call_tool(spec.tool, dict(spec.arguments))
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"[:300]
            if result.is_error:
                return f"isError: {result.content!r}"[:300]
            text = "\n".join(getattr(c, "text", "") for c in result.content if c.type == "text")
            return None if text == spec.expected else f"unexpected text {text!r}"[:300]

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - started, [o for o in outcomes if o is not None]

    def fan_out(self, spec: ToolSpec, n: int, concurrency: int) -> tuple[float, list[str]]:
        """``n`` calls of ``spec``, ``concurrency`` in flight: wall time and one error per failure."""
        return self.run(self._fan_out(spec, n, concurrency), STALL + n)


def _pids_cpu(pids: list[int], category: str) -> dict[str, float]:
    """CPU seconds of ``pids`` (with their reaped children) under ``category``; gone ones count 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(psutil.Process(pid), reaped=True)
    return {category: total}


# -- one fan-out per path -------------------------------------------------------------------


@dataclass
class PathResult:
    path: str
    calls: int
    seconds: float
    failures: int
    errors: list[str] = field(default_factory=list)  # the first few, verbatim
    cpu_s: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else float("nan")


Check = Callable[[str, Any], "str | None"]


def check_call_result(value: Any, expected: str) -> str | None:
    """None if ``value`` is a dumped CallToolResult with the expected text, else why not."""
    if not isinstance(value, dict):
        return f"not a CallToolResult: {value!r}"[:300]
    if value.get("isError"):
        return f"isError: {value.get('content')!r}"[:300]
    content = value.get("content") or []
    text = "\n".join(
        str(c.get("text", "")) for c in content if isinstance(c, dict) and c.get("type") == "text"
    )
    return None if text == expected else f"unexpected text {text!r}"[:300]


def celery_fan_out(
    app: Any, task: str, args: tuple[Any, ...], n: int, queue: str, check: Check
) -> tuple[float, list[str]]:
    """N tasks ``task(*args)`` published as groups of CHUNK, at most WINDOW outstanding,
    results pushed through the result backend's pub/sub (as mcpq's fan-out reads them),
    with a sweep of every outstanding result when nothing arrived for a second.
    Returns the wall time and one error message per failed call."""
    from celery import group, states
    from celery.result import AsyncResult

    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    arrived: deque[AsyncResult] = deque()
    pending: dict[str, AsyncResult] = {}
    errors: list[str] = []
    published = 0
    started = time.perf_counter()
    last_result = last_sweep = started

    def finish(task_id: str, state: str, value: Any) -> None:
        if state != states.SUCCESS:
            errors.append(f"task {task_id} ended {state}: {value!r}"[:300])
            return
        problem = check(state, value)
        if problem is not None:
            errors.append(problem)

    while published < n or pending:
        while published < n and len(pending) + min(CHUNK, n - published) <= WINDOW:
            ids = [str(uuid.uuid4()) for _ in range(min(CHUNK, n - published))]
            signatures = [app.signature(task, args=args, task_id=i) for i in ids]
            result = group(signatures, app=app).apply_async(queue=queue, add_to_parent=False)
            children = {str(r.id): r for r in result.results}
            for task_id in ids:
                child = children.get(task_id) or AsyncResult(task_id, app=app)
                pending[task_id] = child
                child.then(arrived.append)
            published += len(ids)
        if not arrived and consumer is not None:
            with contextlib.suppress(TimeoutError):
                consumer.drain_events(timeout=0.2)
        elif not arrived:
            time.sleep(0.05)
        got = False
        while arrived:
            res = arrived.popleft()
            if pending.pop(str(res.id), None) is None:
                continue
            got = True
            finish(str(res.id), str(res.state), res.result)
        now = time.perf_counter()
        if got:
            last_result = now
            continue
        if pending and now - last_result >= IDLE_SWEEP and now - last_sweep >= IDLE_SWEEP:
            last_sweep = now
            for task_id, meta in backend.get_many(list(pending), interval=0, max_iterations=1):
                res = pending.pop(str(task_id), None)
                if res is None:
                    continue
                last_result = now
                finish(str(task_id), str(meta.get("status")), meta.get("result"))
                with contextlib.suppress(Exception):
                    backend.remove_pending_result(res)
        if pending and now - last_result >= STALL:
            for task_id, res in pending.items():
                errors.append(f"task {task_id}: no result after {STALL:g}s without progress ({res.state})")
                with contextlib.suppress(Exception):
                    backend.remove_pending_result(res)
            pending.clear()
    return time.perf_counter() - started, errors


def mcpq_fan_out(
    tq: ToolQueue, spec: ToolSpec, n: int, chunk_size: int | None, queue: str | None = None
) -> tuple[float, list[str]]:
    arguments = [dict(spec.arguments) for _ in range(n)]
    started = time.perf_counter()
    results = tq.map(spec.tool, arguments, server=spec.server, chunk_size=chunk_size, queue=queue)
    elapsed = time.perf_counter() - started
    errors = []
    if len(results) != n:
        errors.append(f"map returned {len(results)} results for {n} calls")
    for r in results:
        if not r.success:
            errors.append(f"{r.error_code}: {r.error}"[:300])
        elif r.text != spec.expected:
            errors.append(f"unexpected text {r.text!r}"[:300])
    return elapsed, errors


# -- the run --------------------------------------------------------------------------------


def _paths_for(spec: ToolSpec, chosen: list[str] | None) -> list[str]:
    if chosen is not None:
        return [p for p in PATHS if p in chosen]
    wanted = set(DEFAULT_PATHS) | (set(IO_BOUND_PATHS) if spec.io_bound else set())
    return [p for p in PATHS if p in wanted]


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    tools = [TOOLS[t] for t in args.tools]
    report: dict[str, Any] = {
        "calls": args.calls,
        "cpc_calls": args.cpc_calls,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine_info(),
        "git": git_state(),
        "tools": {},
    }
    with contextlib.ExitStack() as stack:
        redis_port = free_port()
        redis_base = f"redis://127.0.0.1:{redis_port}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-bench-")))
        config_path = workdir / "servers.yaml"
        app, settings = load_mcpq(bench_env(redis_base, config_path, tag), "bench.throughput")
        # Only now, with the MCPQ_* environment set, may these (which import mcpq's app) be imported.
        import bench.baselines
        import mcpq.worker.tasks
        from mcpq.producer.queue import ToolQueue

        assert bench.baselines.bare_call.name in app.tasks and mcpq.worker.tasks.call_tool.name in app.tasks
        from mcpq.producer import fanout

        report["chunk_tasks"] = CHUNK_TASK in app.tasks
        auto_chunk = getattr(fanout, "auto_chunk_size", None)
        report["auto_chunk_size"] = auto_chunk(args.calls) if callable(auto_chunk) else None

        redis_proc = start_redis(stack, redis_port)

        http: DemoServerProcess | None = None
        if any(spec.kind == "http" for spec in tools):
            http = DemoServerProcess(child_env(), "http")
            stack.callback(http.stop)
            http.start()
        servers: dict[str, dict[str, Any]] = {MCPQ_SERVER["stdio"]: stdio_server()}
        if http is not None:
            servers[MCPQ_SERVER["http"]] = {"transport": "http", "url": http.url}
        write_config(config_path, servers)

        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        stack.callback(no_backend_retries, app)

        worker_env = child_env({"BENCH_INSTRUMENT": "0"})  # no timeline wrappers from bench.app
        if http is not None:
            worker_env[bench.baselines.HTTP_URL_ENV] = http.url
        concurrency = args.concurrency or settings.worker_concurrency
        cores = os.cpu_count() or 1
        report["workers"] = {"count": args.workers, "pool": "threads", "concurrency": concurrency}
        report["prefork"] = {"pool": "prefork", "concurrency": cores}

        fleet = Fleet()
        stack.callback(fleet.stop)
        directs: dict[str, DirectPool] = {}

        def close_directs() -> None:
            for direct in directs.values():
                direct.close()

        stack.callback(close_directs)
        # By kind of process; the workers' trees and the direct clients' servers (started
        # on first use) are looked up anew at every snapshot.
        meter = CpuMeter(CPU_CATEGORIES)
        meter.add("bench", os.getpid())
        if redis_proc.process is not None:
            meter.add("redis", redis_proc.process.pid)
        if http is not None:
            meter.add("http server", http.pid, reaped=True)
        meter.add_source(
            lambda: _pids_cpu([pid for d in directs.values() for pid in d.server_pids], "stdio servers")
        )
        meter.add_source(fleet.cpu_by_kind)

        main_workers: list[BenchWorker] = []
        if tools:
            main_workers = [
                BenchWorker(worker_env, settings.queue, concurrency, "threads", node=f"{settings.queue}-w{i}")
                for i in range(args.workers)
            ]
            print(f"starting {args.workers} worker(s), threads -c {concurrency}", file=sys.stderr)
            fleet.start(app, main_workers)

        def direct_for(kind: str) -> DirectPool:
            if kind not in directs:
                target: Any
                if kind == "stdio":
                    target = stdio_params()
                else:
                    assert http is not None
                    target = http.url
                directs[kind] = DirectPool(kind, target)
                directs[kind].start()
            return directs[kind]

        prefork: list[BenchWorker] = []
        prefork_queue = f"{settings.queue}-prefork"

        def ensure_prefork() -> None:
            if not prefork:
                prefork.append(
                    BenchWorker(worker_env, prefork_queue, cores, "prefork", node=f"{settings.queue}-prefork")
                )
                print(f"starting the prefork worker (-P prefork -c {cores})", file=sys.stderr)
                fleet.start(app, prefork)

        def runner(spec: ToolSpec, path: str) -> Callable[[int], tuple[float, list[str]]]:
            call_args = (spec.kind, spec.tool, dict(spec.arguments))

            def check_floor(state: str, value: Any) -> str | None:
                return None if value == {"ok": True} else f"bench.noop returned {value!r}"[:300]

            def check_call(state: str, value: Any) -> str | None:
                return check_call_result(value, spec.expected)

            if path == "floor":
                return lambda n: celery_fan_out(app, "bench.noop", (), n, settings.queue, check_floor)
            if path == "bare":
                return lambda n: celery_fan_out(
                    app, "bench.bare_call", call_args, n, settings.queue, check_call
                )
            if path == "bare_prefork":
                ensure_prefork()
                return lambda n: celery_fan_out(
                    app, "bench.bare_call", call_args, n, prefork_queue, check_call
                )
            if path == "connect_per_call":
                return lambda n: celery_fan_out(
                    app, "bench.cpc_call", call_args, n, settings.queue, check_call
                )
            if path == "direct":
                direct = direct_for(spec.kind)
                return lambda n: direct.fan_out(spec, n, args.direct_concurrency)
            if path == "mcpq":
                return lambda n: mcpq_fan_out(tq, spec, n, 1)
            if path == "mcpq_chunked":
                return lambda n: mcpq_fan_out(tq, spec, n, None)
            raise ValueError(path)

        for spec in tools:
            paths = _paths_for(spec, args.paths)
            print(f"tool {spec.name}: {', '.join(paths)}", file=sys.stderr)
            results: dict[str, list[PathResult]] = {p: [] for p in paths}
            for round_no in range(args.rounds):
                # Order rotates between rounds, so drift on the machine hits the paths alike.
                order = paths[round_no % len(paths) :] + paths[: round_no % len(paths)]
                for path in order:
                    n = args.cpc_calls if path == "connect_per_call" else args.calls
                    fn = runner(spec, path)
                    if round_no == 0:
                        warm = (
                            min(args.cpc_warmup, args.warmup) if path == "connect_per_call" else args.warmup
                        )
                        _warm_up(path, fn, warm)
                    time.sleep(args.pause)
                    cpu: dict[str, float] = {}
                    with meter.measure(cpu):
                        seconds, errors = fn(n)
                    res = PathResult(path, n, seconds, len(errors), errors[:5], cpu)
                    results[path].append(res)
                    failed = f"  {len(errors)} FAILED" if errors else ""
                    print(f"  {path:<17} {n:6d} calls {seconds:8.2f} s {res.rate:9.1f} calls/s{failed}",
                          file=sys.stderr)  # fmt: skip
                    time.sleep(args.pause)
            summary = {p: _aggregate(rs) for p, rs in results.items()}
            report["tools"][spec.name] = {
                "tool": spec.tool,
                "kind": spec.kind,
                "arguments": spec.arguments,
                "paths": summary,
                "ratios": _ratios(spec, summary),
            }
            if prefork:
                fleet.stop(prefork)
                prefork.clear()

        if args.scaling:
            if main_workers:
                fleet.stop(main_workers)
            report["scaling"] = _scaling(args, app, tq, fleet, meter, worker_env, settings.queue)
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


def _warm_up(path: str, fn: Callable[[int], tuple[float, list[str]]], calls: int) -> None:
    if calls:
        _, errors = fn(calls)
        if errors:
            print(
                f"  {path}: {len(errors)} of {calls} warm-up calls failed, e.g. {errors[0]}", file=sys.stderr
            )


def _aggregate(rounds: list[PathResult]) -> dict[str, Any]:
    """One path over its rounds: the median rate, failures and CPU summed."""
    rates = [r.rate for r in rounds]
    cpu: dict[str, float] = {}
    for r in rounds:
        for key, value in r.cpu_s.items():
            cpu[key] = cpu.get(key, 0.0) + value
    return {
        "calls": rounds[0].calls,
        "rounds": len(rounds),
        "calls_per_s": statistics.median(rates),
        "rates": rates,
        "seconds": statistics.median(r.seconds for r in rounds),
        "failures": sum(r.failures for r in rounds),
        "errors": [e for r in rounds for e in r.errors][:5],
        "cpu_s": cpu,
        "cpu_calls": sum(r.calls for r in rounds),
    }


def _ratios(spec: ToolSpec, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(num: str, den: str) -> float | None:
        a, b = results.get(num), results.get(den)
        if a is None or b is None or not b["calls_per_s"] > 0:
            return None
        return float(a["calls_per_s"] / b["calls_per_s"])

    out = []
    for num, den, target, io_only in TARGETS:
        if io_only and not spec.io_bound:
            continue
        value = ratio(num, den)
        out.append({"num": num, "den": den, "value": value, "target": target,
                    "met": None if value is None else value >= target})  # fmt: skip
    for num, den in INFO_RATIOS:
        value = ratio(num, den)
        if value is not None:
            out.append({"num": num, "den": den, "value": value, "target": None, "met": None})
    return out


def _scaling(
    args: argparse.Namespace,
    app: Any,
    tq: ToolQueue,
    fleet: Fleet,
    meter: CpuMeter,
    worker_env: dict[str, str],
    base_queue: str,
) -> dict[str, Any]:
    """The sleep tool through mcpq (one task per call) on 1, then 2 workers of one queue."""
    spec = TOOLS[args.scaling_tool]
    queue = f"{base_queue}-scale"
    c = args.scaling_concurrency
    workers: list[BenchWorker] = []
    rows: list[dict[str, Any]] = []
    try:
        for count in (1, 2):
            new = BenchWorker(worker_env, queue, c, "threads", node=f"{base_queue}-scale{count}")
            print(f"scaling: {count} worker(s), threads -c {c}", file=sys.stderr)
            fleet.start(app, [new])
            workers.append(new)
            if args.warmup:
                mcpq_fan_out(tq, spec, max(args.warmup, 20 * count * c), 1, queue)
            time.sleep(args.pause)
            cpu: dict[str, float] = {}
            with meter.measure(cpu):
                seconds, errors = mcpq_fan_out(tq, spec, args.calls, 1, queue)
            res = PathResult(f"mcpq x{count}", args.calls, seconds, len(errors), errors[:5], cpu)
            failed = f"  {len(errors)} FAILED" if errors else ""
            print(f"  {count} worker(s): {res.rate:9.1f} calls/s{failed}", file=sys.stderr)
            rows.append({"workers": count, **asdict(res), "calls_per_s": res.rate})
    finally:
        fleet.stop(workers)
    ratio = rows[1]["calls_per_s"] / rows[0]["calls_per_s"] if len(rows) == 2 else None
    return {"tool": spec.name, "concurrency": c, "rows": rows, "ratio": ratio}


# -- output ---------------------------------------------------------------------------------


def _cpu_cols(cpu_s: dict[str, float], calls: int) -> list[float]:
    per = [1000 * cpu_s.get(k, 0.0) / max(calls, 1) for k in CPU_CATEGORIES]
    return [*per, sum(per)]


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    w = report["workers"]
    cpu_head = " ".join(f"{k.split()[0]:>8}" for k in CPU_CATEGORIES) + f" {'total':>8}"
    lines = [
        f"mcpq fan-out throughput: {report['calls']} calls per path "
        f"(connect_per_call: {report['cpc_calls']}), warm-up {report['warmup']} calls per path"
        + (f", {report['rounds']} rounds (median calls/s)" if report["rounds"] > 1 else ""),
        f"machine: {m['cpus']} CPUs, Python {m['python']}, load (1 min) {m['loadavg_start'][0]:.2f} -> "
        f"{m['loadavg_end'][0]:.2f}; code {report['git']}",
        f"workers: {w['count']} x -P {w['pool']} -c {w['concurrency']} (all paths but direct and "
        f"bare_prefork); bare_prefork: -P prefork -c {report['prefork']['concurrency']}",
        "mcpq_chunked: "
        + (
            f"chunk_size=None packs calls into mcpq.call_chunk tasks "
            f"({report['auto_chunk_size']} calls each for {report['calls']})"
            if report["chunk_tasks"]
            else "this checkout has no mcpq.call_chunk task: chunk_size=None = one task per call, "
            "published in groups of 200 (and mcpq's chunk_size=1 = one group per call)"
        ),
        "paths: " + "; ".join(f"{p} = {label}" for p, label in LABELS.items()),
    ]
    for name, section in report["tools"].items():
        args_text = json.dumps(section["arguments"])
        lines += [
            "",
            f"{name}: {section['tool']}({args_text}) over {section['kind']}",
            f"{'path':<17} {'calls':>6} {'seconds':>8} {'calls/s':>9} {'failed':>6} "
            f"| CPU ms per call: {cpu_head}",
        ]
        for path, r in section["paths"].items():
            cols = " ".join(f"{v:8.3f}" for v in _cpu_cols(r["cpu_s"], r["cpu_calls"]))
            lines.append(
                f"{path:<17} {r['calls']:6d} {r['seconds']:8.2f} {r['calls_per_s']:9.1f} {r['failures']:6d} "
                f"| {'':16} {cols}"
            )
        for ratio in section["ratios"]:
            if ratio["target"] is None:
                continue
            label = f"{ratio['num']} / {ratio['den']}"
            if ratio["value"] is None:
                lines.append(f"  target {label:<32} n/a (path not run)       (target >= {ratio['target']:g})")
            else:
                verdict = "met" if ratio["met"] else "NOT met"
                lines.append(
                    f"  target {label:<32} {ratio['value']:8.2f}   (target >= {ratio['target']:g}): {verdict}"
                )
        if report["rounds"] > 1:
            lines.append(
                "  calls/s per round: "
                + "; ".join(
                    f"{p} " + ", ".join(f"{x:.0f}" for x in r["rates"]) for p, r in section["paths"].items()
                )
            )
        info = [r for r in section["ratios"] if r["target"] is None]
        if info:
            lines.append("  also: " + ", ".join(f"{r['num']}/{r['den']} {r['value']:.2f}" for r in info))
        for path, r in section["paths"].items():
            if r["failures"]:
                lines.append(f"  FAILURES in {path}: {r['failures']} of {r['cpu_calls']}; first ones:")
                lines += [f"    {e}" for e in r["errors"]]
    scaling = report.get("scaling")
    if scaling:
        lines += [
            "",
            f"scaling: {scaling['tool']} through mcpq (chunk_size=1), workers -P threads -c "
            f"{scaling['concurrency']} on one queue and one Redis",
        ]
        for row in scaling["rows"]:
            per_call = _cpu_cols(row["cpu_s"], row["calls"])
            lines.append(
                f"  {row['workers']} worker(s): {row['calls']} calls {row['seconds']:8.2f} s "
                f"{row['calls_per_s']:9.1f} calls/s, {row['failures']} failed; CPU ms/call "
                + ", ".join(f"{k} {v:.3f}" for k, v in zip([*CPU_CATEGORIES, "total"], per_call, strict=True))
            )
            lines += [f"    {e}" for e in row["errors"]]
        if scaling["ratio"] is not None:
            lines.append(f"  2 workers / 1 worker: {scaling['ratio']:.2f}")
    lines += [
        "",
        "CPU columns: bench = this process (producer, and the direct path's client); workers = Celery "
        "worker processes; stdio = stdio servers (those the workers started, including reaped ones, and "
        "the direct client's); http = the Streamable HTTP server; redis = broker, backend and state.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per fan-out (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls per path (default 200)")
    parser.add_argument(
        "--cpc-calls", type=int, default=200, help="calls of the connect_per_call path (default 200)"
    )
    parser.add_argument(
        "--cpc-warmup", type=int, default=10, help="warm-up calls of the connect_per_call path (default 10)"
    )
    parser.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated, of {', '.join(TOOLS)} (default {','.join(DEFAULT_TOOLS)}; '' for none)",
    )
    parser.add_argument(
        "--paths",
        default=None,
        help=f"comma-separated, of {', '.join(PATHS)} (default: all but bare_prefork, which only "
        "the io-bound tools get)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes on the main queue (default 1)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="their -c (default: mcpq's, MCPQ_WORKER_CONCURRENCY or 32)",
    )
    parser.add_argument(
        "--direct-concurrency", type=int, default=32, help="calls in flight on the direct path (default 32)"
    )
    parser.add_argument("--scaling", action="store_true", help="also run the 1-vs-2-workers scaling test")
    parser.add_argument("--scaling-tool", default="sleep20", choices=list(TOOLS), help="(default sleep20)")
    parser.add_argument(
        "--scaling-concurrency", type=int, default=4, help="-c of each scaling worker (default 4)"
    )
    parser.add_argument(
        "--pause", type=float, default=1.0, help="seconds of quiet before and after each fan-out (default 1)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fan-outs per path and tool, order rotating; the median calls/s is reported (default 1)",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    args.tools = [t for t in (s.strip() for s in args.tools.split(",")) if t]
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    if args.paths is not None:
        args.paths = [p for p in (s.strip() for s in args.paths.split(",")) if p]
        bad = [p for p in args.paths if p not in PATHS]
        if bad:
            parser.error(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(PATHS)}")
    if (
        args.scaling_tool
        and args.scaling
        and TOOLS[args.scaling_tool].kind == "http"
        and (args.scaling_tool not in args.tools)
    ):
        parser.error(
            "--scaling-tool over http needs that tool in --tools too (the HTTP server starts for it)"
        )
    if min(args.calls, args.cpc_calls, args.workers, args.rounds) < 1 or args.warmup < 0:
        parser.error("--calls, --cpc-calls, --workers and --rounds must be >= 1, --warmup >= 0")
    if not args.tools and not args.scaling:
        parser.error("nothing to run: no --tools and no --scaling")

    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
