"""Sequential latency of one echo call three ways, in one run, on one machine and broker.

    python -m bench.latency [--calls N] [--warmup N] [--redis-url URL] [--json FILE]

1. direct:  ``mcp.Client`` on the stdio demo server, kept open, ``call_tool("echo")``
            awaited N times back to back (the pooled SDK call, no queue).
2. floor:   a no-op Celery task (``bench.noop``), ``apply_async().get()`` N times
            in a row, through the same broker, backend and worker as mcpq.
3. mcpq:    ``ToolQueue.call("echo", server="bench-stdio")`` N times in a row.
4. direct_idle: the direct call again, but with ``--idle-gap-ms`` of idle time
            before each call, as the stdio server has between two queued calls.

The paths run interleaved in ``--rounds`` blocks (each path N/R calls per round,
order rotating) so drift on a shared machine hits them alike, after ``--warmup``
calls each. The verdict is ``mcpq / (floor + direct)`` on medians (target 1.25).

Then, on the same worker:

- a stage timeline (``--timeline N``, default 200 alternating floor/mcpq calls):
  producer and worker timestamps on one clock (CLOCK_MONOTONIC), and the parts
  of mcpq's task body timed in situ by wrappers that ``bench.app`` installs in
  the worker (``BENCH_INSTRUMENT=0`` or ``--timeline 0`` leaves them out);
- the isolated layers (``bench.split``, unless ``--no-split``): the same parts
  called back to back inside the worker, with no queue around them;
- CPU per call of every process involved, per path.

Experiments (not mcpq's configuration; the header says so when used):
``--pool prefork|solo``, ``--concurrency``, ``--conf KEY=JSON`` (a Celery setting).

A private redis-server (``EmbeddedRedis``) carries broker (db 0), results (db 1)
and state (db 2) unless ``--redis-url`` names one; every process started here
is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.cpu import CpuMeter, per_call_ms
from bench.environment import (
    bench_env,
    check_redis,
    child_env,
    drop_keys,
    free_port,
    git_state,
    load_mcpq,
    machine_info,
    stdio_server,
    write_config,
)
from bench.harness import (
    DirectClient,
    WorkerProcess,
    cmdline,
    is_demo_server,
    no_backend_retries,
    start_redis,
    wait_for_worker,
)
from bench.runner import add_json_option, key_json, run_and_report
from bench.stats import summarize

# Nothing from producer/ or worker/ is imported at module level (see bench/environment.py):
# the worker's app (``bench.app`` -> ``mcpq.worker.celery.app``) must see this run's Redis.
# ``run`` sets the environment first and imports afterwards.

SERVER = "bench-stdio"
ECHO_ARGS = {"text": "x"}
PATHS = ("direct", "floor", "mcpq", "direct_idle")
WORKER_CONCURRENCY = 8
CALL_TIMEOUT = 30.0
TARGET_RATIO = 1.25
IDLE_GAP_MS = 5.0


class EchoClient(DirectClient):
    """The direct path: ``call_tool("echo")`` on the pooled SDK client, timed on its loop."""

    async def _series(self, n: int, idle_s: float) -> list[float]:
        client = self.client
        assert client is not None
        out: list[float] = []
        for _ in range(n):
            if idle_s:
                await asyncio.sleep(idle_s)  # both ends sit idle, as between queued calls
            t0 = time.perf_counter()
            result = await client.call_tool("echo", dict(ECHO_ARGS))
            out.append((time.perf_counter() - t0) * 1000)
            if result.is_error:
                raise RuntimeError(f"direct echo failed: {result}")
        return out

    def series(self, n: int, idle_s: float = 0.0) -> list[float]:
        """``n`` echo calls back to back, each after ``idle_s`` s of idle time; ms each."""
        return self.run(self._series(n, idle_s), (CALL_TIMEOUT + idle_s) * max(n, 1))


# -- the run ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "calls": args.calls,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine_info(),
        "git": git_state(),
    }
    with contextlib.ExitStack() as stack:
        redis_port: int | None = None
        if args.redis_url:
            redis_base = re.sub(r"/\d+$", "", args.redis_url.rstrip("/"))
            check_redis(redis_base, "bench.latency")
        else:
            redis_port = free_port()
            redis_base = f"redis://127.0.0.1:{redis_port}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-bench-")))
        config_path = workdir / "servers.yaml"
        write_config(config_path, {SERVER: stdio_server()})
        env = bench_env(redis_base, config_path, tag)
        overrides: dict[str, Any] = dict(args.conf)
        if overrides:
            env["BENCH_CELERY_CONF"] = json.dumps(overrides)
        app, settings = load_mcpq(env, "bench.latency")
        from bench.app import noop
        from mcpq.producer.queue import ToolQueue

        redis_proc = start_redis(stack, redis_port) if redis_port is not None else None
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        if args.redis_url:
            stack.callback(drop_keys, settings.redis_url, f"{settings.key_prefix}*")
            stack.callback(drop_keys, settings.broker_url, f"*{settings.queue}*")
        stack.callback(no_backend_retries, app)

        worker_env = child_env({"BENCH_INSTRUMENT": "0"} if args.timeline == 0 else None)
        report["celery_overrides"] = overrides
        report["worker"] = {"pool": args.pool, "concurrency": args.concurrency}
        worker = WorkerProcess(worker_env, settings.queue, args.concurrency, args.pool)
        stack.callback(worker.stop)
        worker.start()
        wait_for_worker(app, worker)
        print(f"worker up (pid {worker.pid}); connecting the direct client", file=sys.stderr)

        direct = EchoClient()
        stack.callback(direct.close)
        direct.start()

        def call_floor() -> None:
            out = noop.apply_async(queue=settings.queue).get(timeout=CALL_TIMEOUT)
            if out != {"ok": True}:
                raise RuntimeError(f"bench.noop returned {out!r}")

        exec_ms: list[float] = []

        def call_mcpq() -> None:
            result = tq.call("echo", dict(ECHO_ARGS), server=SERVER, wait=CALL_TIMEOUT)
            if not result.success or result.text != "x":
                raise RuntimeError(f"mcpq echo failed: {result}\nworker log:\n{worker.log_tail()}")
            exec_ms.append(result.execution_time_ms)

        def timed(fn: Callable[[], None], n: int) -> list[float]:
            out: list[float] = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1000)
            return out

        idle_s = args.idle_gap_ms / 1000
        runners: dict[str, Callable[[int], list[float]]] = {
            "direct": direct.series,
            "floor": lambda n: timed(call_floor, n),
            "mcpq": lambda n: timed(call_mcpq, n),
            "direct_idle": lambda n: direct.series(n, idle_s),
        }

        print(f"warming up ({args.warmup} calls per path)", file=sys.stderr)
        warm: dict[str, list[float]] = {}
        for path in PATHS:
            warm[path] = runners[path](args.warmup)
        exec_ms.clear()
        report["idle_gap_ms"] = args.idle_gap_ms
        report["warmup_medians"] = {p: summarize(v)["median"] for p, v in warm.items() if v}

        meter = CpuMeter()
        meter.add("bench", os.getpid())
        meter.add("worker", worker.pid)
        for child in psutil.Process(worker.pid).children(recursive=True):
            if is_demo_server(child):
                meter.add("worker's stdio server", child.pid)
            elif "celery" in " ".join(cmdline(child)):
                meter.add("worker's pool child", child.pid)  # prefork: all children add up
        for pid in direct.server_pids:
            meter.add("direct's stdio server", pid)
        if redis_proc is not None and redis_proc.process is not None:
            meter.add("redis", redis_proc.process.pid)

        cpu_used: dict[str, dict[str, float]] = {}
        samples: dict[str, list[float]] = {p: [] for p in PATHS}
        rounds = max(1, min(args.rounds, args.calls))
        sizes = [args.calls // rounds + (1 if i < args.calls % rounds else 0) for i in range(rounds)]
        for i, size in enumerate(sizes):
            order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
            print(f"round {i + 1}/{rounds}: {size} calls per path, order {', '.join(order)}", file=sys.stderr)
            for path in order:
                with meter.measure(cpu_used.setdefault(path, {})):
                    samples[path] += runners[path](size)

        report["protocol"] = {
            "direct": direct.protocol_version,
            "mcpq": next((s.get("protocol_version") for s in tq.servers() if s["name"] == SERVER), None),
        }
        report["results"] = {p: summarize(samples[p]) for p in PATHS}
        report["mcpq_execution_time_ms"] = summarize(exec_ms)
        report["cpu_ms_per_call"] = per_call_ms(cpu_used, {p: len(samples[p]) for p in PATHS})

        if args.timeline:
            print(f"stage timeline ({args.timeline} calls per path, alternating)", file=sys.stderr)
            report["timeline"] = _timeline(app, settings.queue, tq, noop, args.timeline)

        if not args.no_split:
            print("timing the layers of a call inside the worker (bench.split)", file=sys.stderr)
            split_calls = max(args.calls // 2, 50)
            report["split"] = app.send_task(
                "bench.split",
                kwargs={"server": SERVER, "calls": split_calls, "warmup": args.warmup, "rounds": rounds},
                queue=settings.queue,
            ).get(timeout=CALL_TIMEOUT * split_calls)
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


STAGES = {
    "to_task": "submit -> task starts in the pool (task_prerun)",
    "to_consumer": "  of which submit -> consumer has it (received)",
    "to_thread": "  of which consumer -> pool thread",
    "in_task": "in the task (prerun -> result stored)",
    "before_body": "  STARTED store, task wrapper (-> body)",
    "body": "  body: MCPClientManager.call_tool",
    "resolve": "    resolve tool -> server",
    "validate": "    validate arguments",
    "admit": "    admit: breaker, limits, claim (Redis Lua)",
    "execute": "    pool.run: hop + session + SDK + dump",
    "sdk": "      of which Client.call_tool on the loop",
    "hop": "      of which the rest (hop, session, dump)",
    "complete": "    complete: outcome, claim (Redis Lua)",
    "result": "    build ToolResult",
    "body_other": "    rest of the router",
    "after_body": "  to_dict, SUCCESS store + publish",
    "to_producer": "result published -> producer has it",
    "total": "round trip",
    "publish": "(the publish call alone; overlaps the first stage)",
}
_BODY_PARTS = ("resolve", "validate", "admit", "execute", "complete", "result")


def _timeline(app: Any, queue: str, tq: Any, noop: Any, calls: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per-stage durations of floor and mcpq calls on one clock (CLOCK_MONOTONIC)."""
    app.send_task("bench.timeline", args=["start"], queue=queue).get(timeout=CALL_TIMEOUT)
    producer: dict[str, list[tuple[str, float, float, float]]] = {"floor": [], "mcpq": []}
    try:
        for _ in range(calls):
            t0 = time.monotonic()
            res = noop.apply_async(queue=queue)
            t1 = time.monotonic()
            res.get(timeout=CALL_TIMEOUT)
            producer["floor"].append((str(res.id), t0, t1, time.monotonic()))
            t0 = time.monotonic()
            handle = tq.submit("echo", dict(ECHO_ARGS), server=SERVER)
            t1 = time.monotonic()
            result = handle.result(CALL_TIMEOUT)
            producer["mcpq"].append((handle.id, t0, t1, time.monotonic()))
            if not result.success:
                raise RuntimeError(f"mcpq echo failed: {result}")
    finally:
        marks: dict[str, dict[str, float]] = app.send_task("bench.timeline", args=["stop"], queue=queue).get(
            timeout=CALL_TIMEOUT
        )
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path, rows in producer.items():
        stages: dict[str, list[float]] = {k: [] for k in STAGES}
        for task_id, t0, t1, t5 in rows:
            m = marks.get(task_id)
            if not m or not {"prerun", "stored"} <= m.keys():
                continue
            stages["publish"].append(t1 - t0)
            stages["to_task"].append(m["prerun"] - t0)
            if "received" in m:
                stages["to_consumer"].append(m["received"] - t0)
                stages["to_thread"].append(m["prerun"] - m["received"])
            stages["in_task"].append(m["stored"] - m["prerun"])
            stages["to_producer"].append(t5 - m["stored"])
            stages["total"].append(t5 - t0)
            if "body_start" in m and "body_end" in m:
                stages["before_body"].append(m["body_start"] - m["prerun"])
                stages["after_body"].append(m["stored"] - m["body_end"])
            if "d:body" in m:
                stages["body"].append(m["d:body"])
                for part in _BODY_PARTS:
                    stages[part].append(m.get(f"d:{part}", 0.0))
                stages["sdk"].append(m.get("d:sdk", 0.0))
                stages["hop"].append(m.get("d:execute", 0.0) - m.get("d:sdk", 0.0))
                stages["body_other"].append(m["d:body"] - sum(m.get(f"d:{p}", 0.0) for p in _BODY_PARTS))
        out[path] = {k: summarize([v * 1000 for v in vals]) for k, vals in stages.items() if vals}
    return out


# -- output -------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    lines = [
        f"mcpq latency benchmark: {int(res['mcpq']['n'])} sequential echo calls per path, "
        f"{report['warmup']} warm-up, {report['rounds']} interleaved rounds",
        f"machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
        f"load {report['machine']['loadavg_start'][0]:.2f} -> {report['machine']['loadavg_end'][0]:.2f}; "
        f"code {report['git']}",
        f"protocol: direct {report['protocol']['direct']}, mcpq {report['protocol']['mcpq']}"
        + (
            f"; EXPERIMENT: Celery settings {json.dumps(report['celery_overrides'])}"
            if report.get("celery_overrides")
            else ""
        )
        + (
            ""
            if report["worker"] == {"pool": "threads", "concurrency": WORKER_CONCURRENCY}
            else f"; EXPERIMENT: worker -P {report['worker']['pool']} -c {report['worker']['concurrency']}"
        ),
        "",
        f"{'path':<40} {'median':>8} {'p90':>8} {'p99':>8} {'mean':>8}   (ms)",
    ]
    labels = {
        "direct": "direct pooled SDK call (mcp.Client)",
        "floor": "Celery floor (no-op task round trip)",
        "mcpq": "mcpq (ToolQueue.call)",
        "direct_idle": f"direct, {report['idle_gap_ms']:.1f} ms idle before each",
    }
    for path in PATHS:
        s = res[path]
        lines.append(
            f"{labels[path]:<40} {s['median']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f} {s['mean']:8.3f}"
        )
    d, f, m, di = (res[p]["median"] for p in PATHS)
    ratio = m / (f + d)
    overhead = m - f - d
    lines += [
        "",
        f"ratio  mcpq / (floor + direct), medians: {m:.3f} / ({f:.3f} + {d:.3f}) = {ratio:.3f}"
        f"   (target <= {TARGET_RATIO})",
        f"mcpq overhead, medians: mcpq - floor - direct = {overhead:+.3f} ms",
        f"with the idle-gap direct call instead: mcpq / (floor + direct_idle) = {m / (f + di):.3f}, "
        f"overhead {m - f - di:+.3f} ms",
        f"in-worker router time (ToolResult.execution_time_ms), median: "
        f"{report['mcpq_execution_time_ms']['median']:.3f} ms",
    ]
    cpu = report["cpu_ms_per_call"]
    names = sorted({n for per in cpu.values() for n in per})
    lines += ["", "CPU per call (ms, user+system):", f"{'process':<24}" + "".join(f"{p:>12}" for p in PATHS)]
    for name in names:
        lines.append(
            f"{name:<24}" + "".join(f"{cpu.get(p, {}).get(name, float('nan')):12.3f}" for p in PATHS)
        )
    lines.append(f"{'total':<24}" + "".join(f"{sum(cpu.get(p, {}).values()):12.3f}" for p in PATHS))
    tl = report.get("timeline")
    if tl:
        lines += [
            "",
            f"stage timeline, medians in ms ({int(tl['floor']['total']['n'])} calls per path, alternating):",
            f"{'stage':<52} {'floor':>8} {'mcpq':>8} {'diff':>8}",
        ]
        for key, label in STAGES.items():
            a = tl["floor"].get(key, {}).get("median")
            b = tl["mcpq"].get(key, {}).get("median")
            if a is None and b is None:
                continue
            cols = [f"{v:8.3f}" if v is not None else f"{'':>8}" for v in (a, b)]
            diff = f"{b - a:+8.3f}" if a is not None and b is not None else ""
            lines.append(f"{label:<52} {cols[0]} {cols[1]} {diff}")
        lines.append("(medians of each stage; they need not add up to the median round trip)")
        lines += _overhead_summary(report)
    split = report.get("split")
    if split:
        lines += [
            "",
            "isolated, inside the worker: each layer called back to back from a pool thread, no queue"
            " (warm, uncontended), ms:",
            f"{'layer':<44} {'median':>8} {'p90':>8} {'p99':>8}",
        ]
        split_labels = {
            "task_body": "task body: manager.call_tool().to_dict()",
            "pool_run": "pool.run(with_session(call_tool))",
            "sdk_in_pool_run": "  of which client.call_tool on the loop",
            "sdk_on_loop": "SDK alone on the worker's loop",
            "empty_hop": "empty pool.run (thread -> loop -> thread)",
            "state_redis_ping": "state Redis PING",
            "breaker_admit_complete": "admit + complete scripts, no claim (2 RTs)",
        }
        split_cpu = split.get("cpu_ms_per_call", {})
        lines[-1] += f" {'CPU:worker':>11} {'CPU:server':>11}"
        for key, label in split_labels.items():
            if key not in split:
                continue
            s = split[key]
            c = split_cpu.get(key)
            cpu_cols = f" {c['worker']:11.3f} {c['stdio_server']:11.3f}" if c else ""
            lines.append(f"{label:<44} {s['median']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f}{cpu_cols}")
    return "\n".join(lines)


def _overhead_summary(report: dict[str, Any]) -> list[str]:
    """Where mcpq's extra time goes, from the instrumented timeline (same calls, medians)."""
    tl = report["timeline"]
    floor, mcpq = tl["floor"], tl["mcpq"]
    if "sdk" not in mcpq:
        return []

    def med(stages: dict[str, dict[str, float]], key: str) -> float:
        return stages.get(key, {}).get("median", 0.0)

    res = report["results"]
    rest = sum(med(mcpq, k) for k in ("resolve", "validate", "result", "body_other"))
    rows = [
        (
            "SDK call on the worker's loop",
            med(mcpq, "sdk"),
            f"direct {res['direct']['median']:.3f} back to back, "
            f"{res['direct_idle']['median']:.3f} after idling",
        ),
        ("thread hop, session pick, result dump", med(mcpq, "hop"), ""),
        ("admit + complete scripts (2 Redis round trips)", med(mcpq, "admit") + med(mcpq, "complete"), ""),
        ("resolve, validate, build ToolResult, rest", rest, ""),
        (
            "task wrapper and state stores, vs floor",
            med(mcpq, "before_body")
            + med(mcpq, "after_body")
            - med(floor, "before_body")
            - med(floor, "after_body"),
            "",
        ),
        (
            "queue legs, vs floor",
            med(mcpq, "to_task")
            + med(mcpq, "to_producer")
            - med(floor, "to_task")
            - med(floor, "to_producer"),
            "",
        ),
    ]
    lines = [
        "",
        f"where mcpq's time beyond the floor goes (timeline medians; mcpq - floor round trip = "
        f"{med(mcpq, 'total') - med(floor, 'total'):+.3f} ms):",
    ]
    lines += [f"  {label:<48} {value:+8.3f}  {note}".rstrip() for label, value, note in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="measured calls per path (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up calls per path (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved blocks per path (default 5)")
    parser.add_argument(
        "--redis-url", help="use this Redis (base URL; dbs 0, 1, 2) instead of a private redis-server"
    )
    parser.add_argument(
        "--timeline",
        type=int,
        default=200,
        metavar="N",
        help="then time the stages of N floor and N mcpq calls on one clock (default 200; 0 skips)",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        type=key_json,
        metavar="KEY=JSON",
        help="experiment: override a Celery setting in producer and worker, e.g. "
        "--conf task_track_started=false (repeatable)",
    )
    parser.add_argument(
        "--pool",
        choices=["threads", "prefork", "solo"],
        default="threads",
        help="experiment: the worker's pool (default threads, as specified for this benchmark)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=WORKER_CONCURRENCY,
        help=f"the worker's -c (default {WORKER_CONCURRENCY}; use 1 with --pool prefork so the "
        "timeline and split tasks share the one child process)",
    )
    parser.add_argument(
        "--idle-gap-ms",
        type=float,
        default=IDLE_GAP_MS,
        help=f"idle time before each call of the direct_idle path (default {IDLE_GAP_MS:g}: about "
        "what the stdio server idles between two queued calls; the slowdown levels off from there)",
    )
    parser.add_argument("--no-split", action="store_true", help="skip the in-worker layer timing")
    add_json_option(parser)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--calls and --rounds must be >= 1, --warmup >= 0")

    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
