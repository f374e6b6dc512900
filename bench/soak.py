"""Soak: many calls through one worker, watching its resources for growth.

    python -m bench.soak [--calls 20000] [--warmup 1000] [--sample-every 1000] [--json FILE]

Target (from the issue): 20,000 calls through one worker: resident memory
after warm-up grows < 10%; stdio child processes constant; no file-descriptor
growth.

One worker (``python -m celery -A bench.app worker -P threads``, as
bench.harness.WorkerProcess starts it, ``-c`` = mcpq's default concurrency) serves two
servers: the bundled demo server over stdio (the worker's child) and over
Streamable HTTP (started here). Calls go in batches of ``--sample-every``:

- ``echo`` on both servers through ``ToolQueue.map`` (about 45% each, every
  text distinct and checked; ``map`` publishes chunk tasks, ``mcpq.call_chunk``);
- ``add`` through ``map`` (about 10%, the server alternating per batch, the sum checked);
- 2% per server as single ``ToolQueue.submit`` calls (``mcpq.call_tool`` tasks,
  one ledger write each), all submitted before their results are read;
- one of each of these per server, failing on purpose:
  ``invalid_arguments`` (``echo`` with ``text: 5``: the worker's schema check,
  nothing is sent), ``tool_not_found`` (a tool neither server offers) and
  ``timeout`` (``sleep 2000 ms`` with a 0.5 s deadline; the servers have
  ``retry_attempts: 1``, so the retry-by-re-enqueue path runs too, as
  ``sleep`` is annotated idempotent, and the call ends as ``timeout`` with
  ``attempts == 2``).

Every result is checked: successes carry the right text or sum, failures
exactly the expected error code; anything else is listed and makes the run
exit 1.

After the warm-up and after every batch, with the worker idle: a probe task
(``bench.soak.probe``, registered in the worker with ``--include bench.soak``;
it adds one result key per sample) runs ``gc.collect()`` and counts live
objects by type; then the worker process is sampled (RSS, USS, open fds by
kind, TCP connections by peer, threads, child processes and their RSS), as
are the HTTP server and Redis (``used_memory``, keys per db, keys by kind with
the TTL and size of one of each). Verdicts compare the post-warm-up sample
with the last one, and the middle one with the last one (growth that goes on
in the second half is a leak; growth that stopped is pools filling up).

Investigation and experiments: ``--tracemalloc`` traces the worker's Python
allocations from the end of the warm-up on and lists where the survivors were
allocated; the worker gets the environment ``mcpq worker`` gives it (two
malloc arenas), and ``--worker-env MALLOC_ARENA_MAX=16`` (glibc's default on
two cores) changes it; ``--result-expires S`` sets ``MCPQ_RESULT_EXPIRES`` (results and
claims expire sooner, so the key count levels off within the run).

A private redis-server carries broker (db 0), results (db 1) and state (db 2).
Every process started here is stopped on exit, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

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
from bench.harness import (
    DemoServerProcess,
    WorkerProcess,
    cmdline,
    no_backend_retries,
    start_redis,
    wait_for_worker,
)
from bench.runner import add_json_option, key_value, run_and_report

# Nothing from producer/ or worker/ at module level (see bench/environment.py): the
# app is built from MCPQ_* at import time, and ``run`` sets them first. The
# worker imports this module too (``--include bench.soak``); there, and only
# there (BENCH_SOAK_WORKER=1), the probe task is registered at the bottom.

STDIO = "soak-stdio"
HTTP = "soak-http"
SERVERS = (STDIO, HTTP)
PROBE_TASK = "bench.soak.probe"
CALL_TIMEOUT = 30.0
TIMEOUT_SLEEP_MS = 2000
TIMEOUT_DEADLINE = 0.5
RSS_TARGET = 0.10
FD_TOLERANCE = 3
NO_SUCH_TOOL = "soak_no_such_tool"


# -- what one batch sends -----------------------------------------------------------


@dataclass
class Group:
    """One ``ToolQueue.map`` call of a batch (or, ``single``, one ``ToolQueue.submit``
    per call, all submitted before any result is read) and what each result must be."""

    label: str
    tool: str
    server: str
    arguments: list[dict[str, Any]]
    timeout: float | None = None
    expect_code: str | None = None  # None: success
    expect_attempts: int | None = None
    single: bool = False

    def check(self, index: int, result: Any) -> str | None:
        """None if the result is the expected one, else what is wrong."""
        args = self.arguments[index]
        if self.expect_code is not None:
            if result.success or result.error_code != self.expect_code:
                return f"expected {self.expect_code}, got {result.error_code or 'success'}: {result.error}"
            if self.expect_attempts is not None and result.attempts != self.expect_attempts:
                return f"expected {self.expect_attempts} attempts, got {result.attempts}"
            return None
        if not result.success:
            return f"expected success, got {result.error_code}: {result.error}"
        if self.tool == "echo" and result.text != args["text"]:
            return f"echo returned {result.text!r}, sent {args['text']!r}"
        if self.tool == "add":
            got = (result.structured or {}).get("result")
            if got != args["a"] + args["b"]:
                return f"add returned {got!r}, expected {args['a'] + args['b']!r}"
        return None


def plan_batch(n: int, batch: int, tag: str) -> list[Group]:
    """About n calls: echo on both servers, some add, and one of each failing call per server."""
    failing: list[Group] = []
    for server in SERVERS:
        failing += [
            Group("invalid_arguments", "echo", server, [{"text": 5}], expect_code="invalid_arguments"),
            Group("tool_not_found", NO_SUCH_TOOL, server, [{}], expect_code="tool_not_found"),
            Group(
                "timeout (+1 retry)",
                "sleep",
                server,
                [{"ms": TIMEOUT_SLEEP_MS}],
                timeout=TIMEOUT_DEADLINE,
                expect_code="timeout",
                expect_attempts=2,
            ),
        ]
    n_single = max(n // 50, 1)  # per server: single submits, i.e. mcpq.call_tool tasks, not chunks
    rest = max(n - len(failing) - 2 * n_single, 2)
    n_add = rest // 10
    n_echo = rest - n_add
    add_server = SERVERS[batch % 2]
    groups = [
        Group(
            "echo",
            "echo",
            server,
            [{"text": f"{tag}-{batch}-{server}-{i}"} for i in range(n_echo // 2 + (n_echo % 2 if k else 0))],
        )
        for k, server in enumerate(SERVERS)
    ]
    groups.append(
        Group("add", "add", add_server, [{"a": batch * 1000 + i, "b": i / 4} for i in range(n_add)])
    )
    groups += [
        Group(
            "echo, single submits",
            "echo",
            server,
            [{"text": f"{tag}-{batch}-{server}-single-{i}"} for i in range(n_single)],
            single=True,
        )
        for server in SERVERS
    ]
    return [g for g in groups + failing if g.arguments]


@dataclass
class Tally:
    calls: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


def run_batch(tq: Any, groups: list[Group], tally: Tally) -> None:
    for group in groups:
        if group.single:
            handles = [
                tq.submit(group.tool, args, server=group.server, timeout=group.timeout)
                for args in group.arguments
            ]
            results = [handle.result(CALL_TIMEOUT * 4) for handle in handles]
        else:
            results = tq.map(group.tool, group.arguments, server=group.server, timeout=group.timeout)
        if len(results) != len(group.arguments):
            tally.unexpected.append(f"{group.label}: {len(results)} results for {len(group.arguments)} calls")
        for i, result in enumerate(results):
            tally.calls += 1
            key = f"{group.server} {group.label}: {result.error_code or 'success'}"
            tally.by_outcome[key] += 1
            problem = group.check(i, result)
            if problem is not None:
                tally.unexpected.append(f"{group.server}/{group.tool} {group.arguments[i]}: {problem}")


# -- sampling -----------------------------------------------------------------------


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith(("socket:", "pipe:")):
                kinds[target.split(":")[0]] += 1
            elif target.startswith("anon_inode:"):
                kinds[target.removeprefix("anon_inode:").strip("[]")] += 1
            else:
                kinds["file"] += 1
    return dict(kinds)


def _tcp_peers(proc: psutil.Process, ports: dict[int, str]) -> dict[str, int]:
    """The worker's TCP connections by what they talk to (redis, the HTTP server, ...)."""
    out: Counter[str] = Counter()
    with contextlib.suppress(psutil.Error):
        for conn in proc.net_connections(kind="tcp"):
            if conn.raddr:
                out[ports.get(conn.raddr.port, f"port {conn.raddr.port}")] += 1
            else:
                out["listening/unconnected"] += 1
    return dict(out)


def _proc_stats(pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    with proc.oneshot():
        mem = proc.memory_full_info()
        return {"rss": mem.rss, "uss": mem.uss, "fds": proc.num_fds(), "threads": proc.num_threads()}


def _redis_stats(base_url: str, prefix: str) -> dict[str, Any]:
    import redis

    out: dict[str, Any] = {"dbs": {}, "state_kinds": {}, "kind_ttl": {}}
    for db in (0, 1, 2):
        with redis.Redis.from_url(f"{base_url}/{db}", decode_responses=True) as client:
            if db == 0:
                info = client.info("memory")
                out["used_memory"] = int(info["used_memory"])
            out["dbs"][db] = int(client.dbsize())  # type: ignore[arg-type]
            kinds: Counter[str] = Counter()
            example: dict[str, str] = {}
            for key in client.scan_iter(count=1000):
                if db == 2:
                    kind = key.removeprefix(prefix).split(":")[0] if key.startswith(prefix) else "(other)"
                elif db == 1:
                    kind = "celery-task-meta" if key.startswith("celery-task-meta-") else key
                else:
                    kind = key.split("@")[0] if "@" in key else key
                kinds[kind] += 1
                example.setdefault(kind, key)
            for kind, key in example.items():
                ttl = int(client.ttl(key))  # type: ignore[arg-type]
                out["kind_ttl"][f"db{db} {kind}"] = ttl
                out.setdefault("kind_bytes", {})[f"db{db} {kind}"] = client.memory_usage(key)
            out["state_kinds"].update({f"db{db} {k}": v for k, v in kinds.items()})
    return out


@dataclass
class Sampler:
    worker_pid: int
    http_pid: int
    redis_base: str
    prefix: str
    ports: dict[int, str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def sample(self, calls: int, started: float, probe: dict[str, Any] | None) -> dict[str, Any]:
        worker = psutil.Process(self.worker_pid)
        children = worker.children(recursive=True)
        child_rss = 0
        for child in children:
            with contextlib.suppress(psutil.Error):
                child_rss += child.memory_info().rss
        row: dict[str, Any] = {
            "calls": calls,
            "elapsed": time.monotonic() - started,
            "worker": _proc_stats(self.worker_pid),
            "fd_kinds": _fd_kinds(self.worker_pid),
            "tcp_peers": _tcp_peers(worker, self.ports),
            "children": sorted(c.pid for c in children),
            "children_cmd": sorted(" ".join(cmdline(c))[-60:] for c in children),
            "children_rss": child_rss,
            "http_server": _proc_stats(self.http_pid),
            "redis": _redis_stats(self.redis_base, self.prefix),
            "loadavg": os.getloadavg()[0],
        }
        if probe is not None:
            row["gc_objects"] = probe["objects"]
            row["gc_garbage"] = probe["garbage"]
            row["thread_names"] = probe["threads"]
            row["types"] = probe["types"]
            row["redis_pools"] = probe.get("redis_pools", {})
            if probe.get("tracemalloc"):
                row["tracemalloc"] = probe["tracemalloc"]
        self.rows.append(row)
        return row


# -- the worker-side probe ------------------------------------------------------------


def probe_body(top: int = 400, tracemalloc_action: str | None = None) -> dict[str, Any]:
    """In the worker: collect garbage, then count live objects by type.

    ``tracemalloc_action``: ``start`` begins tracing (so later probes see only
    what was allocated since, and is still alive), ``report`` adds the traced
    size and the biggest allocation sites."""
    import gc
    import threading
    import tracemalloc

    gc.collect()
    traced: dict[str, Any] = {}
    if tracemalloc_action == "start" and not tracemalloc.is_tracing():
        tracemalloc.start(1)
    elif tracemalloc_action == "report" and tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
        )
        traced = {
            "current": current,
            "peak": peak,
            "top_lines": [
                f"{stat.size / 1024:.1f} KiB in {stat.count} blocks: {stat.traceback[0].filename}:"
                f"{stat.traceback[0].lineno}"
                for stat in snapshot.statistics("lineno")[:12]
            ],
        }
    counts: Counter[str] = Counter()
    pools: dict[str, list[int]] = {}  # "db2 redis.ConnectionPool (max 100)" -> [pools, connections]
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
        if kind.__name__.endswith("ConnectionPool") and hasattr(obj, "_created_connections"):
            kwargs = getattr(obj, "connection_kwargs", {}) or {}
            name = (
                f"db{kwargs.get('db', '?')} {kind.__module__.split('.')[0]}.{kind.__name__} "
                f"(max {getattr(obj, 'max_connections', '?')})"
            )
            entry = pools.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += int(obj._created_connections)
    threads: Counter[str] = Counter()
    for thread in threading.enumerate():
        threads[thread.name.rstrip("0123456789_-")] += 1
    return {
        "objects": sum(counts.values()),
        "garbage": len(gc.garbage),
        "types": dict(counts.most_common(top)),
        "threads": dict(threads),
        "redis_pools": dict(sorted(pools.items())),
        "tracemalloc": traced,
    }


def _register_probe() -> None:
    from mcpq.worker.celery import app

    @app.task(name=PROBE_TASK)
    def probe(top: int = 400, tracemalloc_action: str | None = None) -> dict[str, Any]:
        return probe_body(top, tracemalloc_action)


# -- the run --------------------------------------------------------------------------------

#: Both servers retry once: the timeout calls go through the retry-by-re-enqueue path.
RETRIES = {"retry_attempts": 1, "retry_delay": 0.2, "retry_max_delay": 0.5}


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "calls": args.calls,
        "warmup": args.warmup,
        "sample_every": args.sample_every,
        "concurrency": args.concurrency,
        "result_expires": args.result_expires,
        "worker_env": args.worker_env,
        "tracemalloc": args.tracemalloc,
        "machine": machine_info(),
        "git": git_state(),
    }
    with contextlib.ExitStack() as stack:
        redis_port = free_port()
        redis_base = f"redis://127.0.0.1:{redis_port}"
        http_port = free_port()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-soak-")))
        config_path = workdir / "servers.yaml"
        write_config(
            config_path,
            {
                STDIO: stdio_server(**RETRIES),
                HTTP: {"transport": "http", "url": f"http://127.0.0.1:{http_port}/mcp", **RETRIES},
            },
        )
        env = bench_env(redis_base, config_path, tag)
        if args.result_expires is not None:
            env["MCPQ_RESULT_EXPIRES"] = str(args.result_expires)
        app, settings = load_mcpq(env, "bench.soak")
        from mcpq.producer.queue import ToolQueue

        concurrency = args.concurrency or settings.worker_concurrency
        report["concurrency"] = concurrency

        start_redis(stack, redis_port)
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        # Always: a result left pending by an error would otherwise retry for a minute
        # and more after Redis is stopped.
        stack.callback(no_backend_retries, app, always=True)

        http = DemoServerProcess(child_env(), "http", http_port)
        stack.callback(http.stop)
        http.start()

        # The environment `mcpq worker` gives its worker (two malloc arenas), then the experiments.
        from mcpq.worker.start import worker_environment

        worker_env = {
            **worker_environment(child_env()),
            "BENCH_INSTRUMENT": "0",
            "BENCH_SOAK_WORKER": "1",
            **args.worker_env,
        }
        # --include: the worker registers the probe task from this module.
        worker = WorkerProcess(
            worker_env, settings.queue, concurrency, extra_args=["--include", "bench.soak"]
        )
        stack.callback(worker.stop)
        worker.start()
        wait_for_worker(app, worker)
        print(f"worker up (pid {worker.pid}, -c {concurrency}); HTTP server pid {http.pid}", file=sys.stderr)

        tracing = False

        def probe() -> dict[str, Any]:
            action = "report" if tracing else None
            out: dict[str, Any] = app.send_task(
                PROBE_TASK, kwargs={"tracemalloc_action": action}, queue=settings.queue
            ).get(timeout=300)
            return out

        peers = {redis_port: "redis", http_port: "http server"}
        sampler = Sampler(worker.pid, http.pid, redis_base, settings.key_prefix, peers)
        started = time.monotonic()
        tally = Tally()
        sampler.sample(0, started, probe())  # before any call: only for reference

        def drive(total: int, first_batch: int, phase: str) -> int:
            batch = first_batch
            done = 0
            while done < total:
                n = min(args.sample_every, total - done)
                before = tally.calls
                t0 = time.monotonic()
                run_batch(tq, plan_batch(n, batch, tag), tally)
                if not worker.alive():
                    raise RuntimeError(f"the worker died:\n{worker.log_tail()}")
                sent = tally.calls - before
                done += sent
                batch += 1
                rate = sent / max(time.monotonic() - t0, 1e-9)
                row = sampler.sample(tally.calls, started, probe())
                row["phase"] = phase
                row["rate"] = rate
                print(
                    f"{phase} {tally.calls:>6} calls  {rate:6.1f}/s  rss {_mib(row['worker']['rss']):>7} MiB"
                    f"  fds {row['worker']['fds']}  threads {row['worker']['threads']}"
                    f"  children {len(row['children'])}  unexpected {len(tally.unexpected)}",
                    file=sys.stderr,
                )
            return batch

        sampler.rows[0]["phase"] = "start"
        batch = drive(args.warmup, 0, "warm-up") if args.warmup else 0
        sampler.rows[-1]["phase"] = "post-warm-up"
        if args.tracemalloc:
            app.send_task(PROBE_TASK, kwargs={"tracemalloc_action": "start"}, queue=settings.queue).get(60)
            tracing = True
        drive(args.calls, batch, "soak")

        report["worker_log_tail"] = worker.log_tail(2000)
        log_text = worker.log_path.read_bytes().decode(errors="replace") if worker.log_path.exists() else ""
        bad = ("ERROR", "CRITICAL", "Traceback")
        report["worker_log_errors"] = sum(1 for line in log_text.splitlines() if any(b in line for b in bad))
        report["worker_log_warnings"] = sum(1 for line in log_text.splitlines() if "WARNING" in line)
        report["rows"] = sampler.rows
        report["outcomes"] = dict(sorted(tally.by_outcome.items()))
        report["unexpected"] = tally.unexpected
        report["total_calls"] = tally.calls
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


# -- output -------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _slope_per_1000(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float:
    """Least-squares slope of value over calls, per 1,000 calls."""
    xs = [float(r["calls"]) for r in rows]
    ys = [float(value(r)) for r in rows]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def render(report: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = report["rows"]
    base_i = next((i for i, r in enumerate(rows) if r.get("phase") == "post-warm-up"), 0)
    base, last = rows[base_i], rows[-1]
    soak = rows[base_i:]
    m = report["machine"]
    lines = [
        f"mcpq soak: {report['total_calls']} calls ({report['warmup']} warm-up + {report['calls']}), "
        f"one worker -P threads -c {report['concurrency']}, stdio + Streamable HTTP demo servers",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, load {m['loadavg_start'][0]:.2f} -> "
        f"{m['loadavg_end'][0]:.2f}; code {report['git']}; result_expires "
        f"{report['result_expires'] if report['result_expires'] is not None else 'default (86400 s)'}",
        "",
        f"{'phase':<12} {'calls':>6} {'time s':>7} {'calls/s':>7} {'RSS MiB':>8} {'ΔRSS':>6} {'USS MiB':>8} "
        f"{'fds':>4} {'thr':>4} {'kids':>4} {'kidRSS':>7} {'httpRSS':>7} {'httpfd':>6} {'redisMiB':>8} "
        f"{'db0':>4} {'db1':>6} {'db2':>6} {'objects':>8}",
    ]
    for r in rows:
        w, h, rd = r["worker"], r["http_server"], r["redis"]
        delta = (w["rss"] - base["worker"]["rss"]) / base["worker"]["rss"] * 100
        lines.append(
            f"{r.get('phase', 'soak'):<12} {r['calls']:>6} {r['elapsed']:7.1f} {r.get('rate', 0.0):7.1f} "
            f"{_mib(w['rss']):>8} {delta:+5.1f}% {_mib(w['uss']):>8} {w['fds']:>4} {w['threads']:>4} "
            f"{len(r['children']):>4} {_mib(r['children_rss']):>7} {_mib(h['rss']):>7} {h['fds']:>6} "
            f"{_mib(rd['used_memory']):>8} {rd['dbs'][0]:>4} {rd['dbs'][1]:>6} {rd['dbs'][2]:>6} "
            f"{r.get('gc_objects', 0):>8}"
        )
    lines.append(
        "(kids: the worker's child processes, i.e. its stdio server; kidRSS their RSS; httpRSS/httpfd: the "
        "HTTP demo server; db0/1/2: keys in broker/results/state; objects: live gc-tracked objects after "
        "gc.collect() in the worker)"
    )

    # Verdicts
    n_soak = last["calls"] - base["calls"]
    mid = soak[len(soak) // 2]  # leak check: does it still grow in the second half?
    second = soak[len(soak) // 2 :]
    rss0, rss_mid, rss1 = base["worker"]["rss"], mid["worker"]["rss"], last["worker"]["rss"]
    growth = (rss1 - rss0) / rss0
    late_growth = (rss1 - rss_mid) / rss_mid
    rss_max = max(r["worker"]["rss"] for r in soak)
    late_slope = _slope_per_1000(second, lambda r: r["worker"]["rss"])
    kids = {tuple(r["children"]) for r in soak}
    fds = [r["worker"]["fds"] for r in soak]
    late_fds = [r["worker"]["fds"] for r in second]
    # Keep-alive connections to the HTTP server come and go with the load
    # (httpx opens one per concurrent request; idle ones are closed after a few
    # seconds): the fds without them are what must not grow.
    steady = [r["worker"]["fds"] - r["tcp_peers"].get("http server", 0) for r in soak]
    late_steady = steady[len(soak) // 2 :]
    http_conns = [r["tcp_peers"].get("http server", 0) for r in soak]
    threads = [r["worker"]["threads"] for r in soak]
    fds_ok = fds[-1] - fds[0] <= FD_TOLERANCE
    steady_ok = steady[-1] - steady[0] <= FD_TOLERANCE
    late_steady_ok = max(late_steady) - late_steady[0] <= FD_TOLERANCE
    lines += [
        "",
        f"verdicts over the {n_soak} calls after warm-up (second half: from {mid['calls']} calls on):",
        f"  RSS {_mib(rss0)} -> {_mib(rss_mid)} -> {_mib(rss1)} MiB: {growth * 100:+.2f}% "
        f"(max {_mib(rss_max)}): {'PASS' if growth < RSS_TARGET else 'FAIL'} (< {RSS_TARGET * 100:.0f}%); "
        f"second half {late_growth * 100:+.2f}%, slope {late_slope / 1024:+.1f} KiB per 1,000 calls",
        f"  USS {' -> '.join(_mib(r['worker']['uss']) for r in (base, mid, last))} MiB",
        f"  stdio child processes: {'constant' if len(kids) == 1 else 'CHANGED'} "
        f"({' / '.join(str(list(k)) for k in sorted(kids))}; {last['children_cmd']}): "
        f"{'PASS' if len(kids) == 1 else 'FAIL'}",
        f"  open fds: {fds[0]} -> {mid['worker']['fds']} -> {fds[-1]} (min {min(fds)}, max {max(fds)}; "
        f"second half min {min(late_fds)}, max {max(late_fds)}): {'PASS' if fds_ok else 'FAIL'} "
        f"(within +{FD_TOLERANCE} of post-warm-up)",
        f"    of which TCP to the HTTP server (keep-alive, varies with load): {http_conns[0]} -> "
        f"{http_conns[-1]} (min {min(http_conns)}, max {max(http_conns)})",
        f"    fds without those: {steady[0]} -> {steady[len(soak) // 2]} -> {steady[-1]} "
        f"(max {max(steady)}): {'PASS' if steady_ok else 'FAIL'} (within +{FD_TOLERANCE} of post-warm-up); "
        f"second half max {max(late_steady)}: {'PASS' if late_steady_ok else 'FAIL'} (no growth)",
        f"    by kind {base['fd_kinds']} -> {mid['fd_kinds']} -> {last['fd_kinds']}",
        f"    TCP peers {base['tcp_peers']} -> {mid['tcp_peers']} -> {last['tcp_peers']}",
        "    redis-py connection pools in the worker, connections created (pools): "
        + "; ".join(
            f"{name} {b[1]} -> {m[1]} -> {e[1]} ({e[0]})"
            for name in sorted(last.get("redis_pools", {}))
            for b, m, e in [[r.get("redis_pools", {}).get(name, [0, 0]) for r in (base, mid, last)]]
        ),
        f"  threads: {threads[0]} -> {threads[-1]} (min {min(threads)}, max {max(threads)}); by name "
        f"{last.get('thread_names', {})}",
        f"  HTTP server: RSS {_mib(base['http_server']['rss'])} -> {_mib(last['http_server']['rss'])} MiB, "
        f"fds {base['http_server']['fds']} -> {last['http_server']['fds']}; stdio server RSS "
        f"{_mib(base['children_rss'])} -> {_mib(last['children_rss'])} MiB",
    ]
    if "gc_objects" in base:
        lines.append(
            f"  live objects in the worker after gc: {base['gc_objects']} -> {last['gc_objects']} "
            f"({(last['gc_objects'] - base['gc_objects']) / max(n_soak, 1) * 1000:+.1f} per 1,000 calls); "
            f"gc.garbage {last.get('gc_garbage')}"
        )
        names = set(base["types"]) | set(last["types"])
        growers = sorted(
            ((t, last["types"].get(t, 0) - base["types"].get(t, 0)) for t in names), key=lambda kv: -kv[1]
        )
        top = [f"{t} {d:+d}" for t, d in growers[:8] if d > 0]
        lines.append(f"    types that grew most: {', '.join(top) or 'none'}")
        lines.append(
            f"    second half: {mid['gc_objects']} -> {last['gc_objects']} "
            f"({last['gc_objects'] - mid['gc_objects']:+d})"
        )
    traced = [r for r in soak if r.get("tracemalloc")]
    if traced:
        lines.append(
            "  tracemalloc (Python allocations since the end of the warm-up, still alive after gc), KiB: "
            + ", ".join(f"{r['calls']}: {r['tracemalloc']['current'] / 1024:.0f}" for r in traced)
        )
        lines += [f"    {line}" for line in traced[-1]["tracemalloc"]["top_lines"]]

    # Redis
    rd0, rd1 = base["redis"], last["redis"]
    kinds = sorted(set(rd0["state_kinds"]) | set(rd1["state_kinds"]))
    lines += [
        "",
        f"Redis: used_memory {_mib(rd0['used_memory'])} -> {_mib(rd1['used_memory'])} MiB "
        f"({(rd1['used_memory'] - rd0['used_memory']) / max(n_soak, 1):+.0f} bytes per call)",
        f"  {'keys by kind':<40} {'post-warm-up':>12} {'end':>8} {'per call':>9} {'TTL of one (s)':>15}"
        f" {'bytes of one':>12}",
    ]
    for kind in kinds:
        a, b = rd0["state_kinds"].get(kind, 0), rd1["state_kinds"].get(kind, 0)
        ttl = rd1["kind_ttl"].get(kind, rd0["kind_ttl"].get(kind))
        ttl_s = "none" if ttl == -1 else ("gone" if ttl in (None, -2) else str(ttl))
        size = rd1.get("kind_bytes", {}).get(kind)
        lines.append(
            f"  {kind[:40]:<40} {a:>12} {b:>8} {(b - a) / max(n_soak, 1):>9.3f} {ttl_s:>15} "
            f"{size if size is not None else '-':>12}"
        )
    grows = [k for k in kinds if rd1["state_kinds"].get(k, 0) - rd0["state_kinds"].get(k, 0) > n_soak // 100]
    unbounded = [k for k in grows if rd1["kind_ttl"].get(k) == -1]
    lines.append(
        f"  growing with calls: {', '.join(grows) or 'nothing'}; of those without a TTL: "
        f"{', '.join(unbounded) or 'none'}"
    )

    per_call = (rd1["used_memory"] - rd0["used_memory"]) / max(n_soak, 1)
    rate = n_soak / max(last["elapsed"] - base["elapsed"], 1e-9)
    expires = report["result_expires"] if report["result_expires"] is not None else 86_400
    level = per_call * rate * expires
    lines.append(
        f"  at this run's {rate:.0f} calls/s and {per_call:.0f} bytes per call, results and claims living "
        f"{expires} s would level off near "
        + (f"{level / 2**30:.1f} GiB" if level >= 2**30 else f"{level / 2**20:.0f} MiB")
        + " of Redis memory (the TTL bounds it, nothing else does)"
    )

    # Outcomes
    lines += ["", "outcomes (all batches, warm-up included):"]
    lines += [f"  {k:<48} {v:>6}" for k, v in report["outcomes"].items()]
    unexpected = report["unexpected"]
    lines.append(f"unexpected results: {len(unexpected)}")
    lines += [f"  {u}" for u in unexpected[:20]]
    lines.append(
        f"worker log: {report['worker_log_errors']} error lines, {report['worker_log_warnings']} warnings"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls after warm-up (default 20000)")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up calls (default 1000)")
    parser.add_argument(
        "--sample-every", type=int, default=1000, help="calls per batch; sample after each (default 1000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=0, help="the worker's -c (default: MCPQ_WORKER_CONCURRENCY's, 32)"
    )
    parser.add_argument(
        "--result-expires",
        type=int,
        default=None,
        metavar="S",
        help="set MCPQ_RESULT_EXPIRES (results and claims expire after S s) to see the key count level off",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="experiment: extra environment for the worker, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="investigate: trace Python allocations in the worker from the end of the warm-up on "
        "(slows it, and its own memory shows in RSS)",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    args.worker_env = dict(args.worker_env)
    if args.calls < 1 or args.warmup < 0 or args.sample_every < 20:
        parser.error("--calls must be >= 1, --warmup >= 0, --sample-every >= 20")

    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 1 if report["unexpected"] else 0


if os.environ.get("BENCH_SOAK_WORKER") == "1":
    _register_probe()

if __name__ == "__main__":
    raise SystemExit(main())
