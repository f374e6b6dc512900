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
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from bench.runner import run_and_report
from bench.stats import summarize

if TYPE_CHECKING:
    from mcpq.producer.embedded_redis import EmbeddedRedis

# Nothing from producer/ or worker/ is imported at module level: importing
# ``producer`` (any submodule) imports ``mcpq.worker.celery``, which builds its app
# from the MCPQ_* environment at import time, and the worker's app
# (``bench.app`` -> ``mcpq.worker.celery.app``) must see this run's Redis. ``run``
# sets the environment first and imports afterwards.

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER = "bench-stdio"
ECHO_ARGS = {"text": "x"}
DEMO_SERVER_ARGS = ["-m", "mcpq.worker.demo_server", "stdio"]
PATHS = ("direct", "floor", "mcpq", "direct_idle")
WORKER_CONCURRENCY = 8
CALL_TIMEOUT = 30.0
TARGET_RATIO = 1.25
IDLE_GAP_MS = 5.0


# -- processes --------------------------------------------------------------------


class WorkerProcess:
    """One Celery worker on ``bench.app`` (threads pool by default), its own session and log file."""

    def __init__(self, env: dict[str, str], queue: str, concurrency: int, pool: str = "threads") -> None:
        self.name = f"{queue}@{platform.node() or 'localhost'}"
        self.argv = [
            sys.executable, "-m", "celery", "-A", "bench.app", "worker",
            "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", self.name,
            "--without-gossip", "--without-mingle", "--loglevel", "warning",
        ]  # fmt: skip
        self.env = env
        fd, name = tempfile.mkstemp(prefix="mcpq-bench-worker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it ourselves
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float | None = None) -> None:
        """Warm shutdown (SIGTERM; it closes its stdio server), then SIGKILL the group.

        After Ctrl-C the grace is short: a Ctrl-C is meant to end things quickly.
        """
        if grace is None:
            grace = 5.0 if _interrupted else 20.0
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"worker {proc.pid} ignored SIGTERM for {grace:g}s; killing it", file=sys.stderr)
        # Anything left in its session (the stdio server it started) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class DirectClient:
    """An ``mcp.Client`` on the stdio demo server, kept open on a private event loop.

    One owner task enters the Client and stays parked until ``close`` (anyio
    wants the entering task to exit it); benchmark blocks run as other tasks
    on the same loop and time each ``call_tool`` inside the loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-direct", daemon=True)
        self.client: Any = None
        self.protocol_version: str | None = None
        self._closing: asyncio.Event | None = None
        self._owner: concurrent.futures.Future[None] | None = None
        self.server_pids: list[int] = []

    def start(self, timeout: float = 60.0) -> DirectClient:
        self.thread.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._owner = asyncio.run_coroutine_threadsafe(self._own(ready), self.loop)
        try:
            ready.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"direct stdio client did not connect within {timeout:g}s") from None
        # The SDK starts the server as our direct child; the worker's server is the worker's.
        self.server_pids = [
            p.pid for p in psutil.Process().children() if "mcpq.worker.demo_server" in " ".join(_cmdline(p))
        ]
        return self

    def _target(self) -> Any:
        """What ``mcp.Client`` connects to: the stdio demo server."""
        from mcp.client.stdio import StdioServerParameters

        return StdioServerParameters(command=sys.executable, args=DEMO_SERVER_ARGS, cwd=str(REPO_ROOT))

    async def _own(self, ready: concurrent.futures.Future[None]) -> None:
        from mcp import Client

        self._closing = asyncio.Event()
        try:
            async with Client(self._target()) as client:
                self.client = client
                self.protocol_version = client.protocol_version
                ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            raise
        finally:
            self.client = None

    async def _series(self, n: int, idle_s: float = 0.0) -> list[float]:
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
        fut = asyncio.run_coroutine_threadsafe(self._series(n, idle_s), self.loop)
        return fut.result((CALL_TIMEOUT + idle_s) * max(n, 1))

    def close(self) -> None:
        if self.thread.is_alive():
            closing = self._closing
            if closing is not None:
                self.loop.call_soon_threadsafe(closing.set)
            if self._owner is not None:
                with contextlib.suppress(Exception):
                    self._owner.result(15)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        for pid in self.server_pids:  # only if the SDK's own close did not end it
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.terminate()
                proc.wait(5)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


# -- CPU accounting ---------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds (user + system) of named processes, sampled around each block."""

    procs: dict[str, psutil.Process] = field(default_factory=dict)
    used: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self.procs[name] = psutil.Process(pid)

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = float("nan")
        return out

    @contextlib.contextmanager
    def measure(self, path: str) -> Iterator[None]:
        before = self.snapshot()
        yield
        after = self.snapshot()
        bucket = self.used.setdefault(path, {})
        for name, value in after.items():
            bucket[name] = bucket.get(name, 0.0) + value - before.get(name, 0.0)

    def per_call_ms(self, calls: dict[str, int]) -> dict[str, dict[str, float]]:
        return {
            path: {name: 1000 * sec / max(calls[path], 1) for name, sec in used.items()}
            for path, used in self.used.items()
        }


# -- the run ----------------------------------------------------------------------


def _bench_env(redis_base: str, config_path: Path, tag: str) -> dict[str, str]:
    return {
        "MCPQ_BROKER_URL": f"{redis_base}/0",
        "MCPQ_RESULT_BACKEND": f"{redis_base}/1",
        "MCPQ_REDIS_URL": f"{redis_base}/2",
        "MCPQ_CONFIG": str(config_path),
        "MCPQ_QUEUE": f"mcpq-bench-{tag}",
        "MCPQ_KEY_PREFIX": f"mcpq-bench-{tag}:",
    }


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--conf takes KEY=JSON, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(path: Path) -> None:
    import yaml

    doc = {
        "mcp_servers": {
            SERVER: {"transport": "stdio", "command": sys.executable, "args": DEMO_SERVER_ARGS},
        }
    }
    path.write_text(yaml.safe_dump(doc))


def _source_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("worker/**/*.py"), *REPO_ROOT.glob("worker/**/*.lua"),
                        *REPO_ROOT.glob("producer/**/*.py")]):  # fmt: skip
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _git_state() -> str:
    """The commit and a fingerprint of worker/ and producer/, which others may be editing."""
    fingerprint = f"source sha256 {_source_fingerprint()}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "producer"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"not a git checkout, {fingerprint}"
    return f"{head}{' + uncommitted changes' if dirty else ''}, {fingerprint}"


_interrupted = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "calls": args.calls,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "git": _git_state(),
    }
    with contextlib.ExitStack() as stack:
        redis_port: int | None = None
        if args.redis_url:
            redis_base = re.sub(r"/\d+$", "", args.redis_url.rstrip("/"))
            _check_redis(redis_base)
        else:
            redis_port = _free_port()
            redis_base = f"redis://127.0.0.1:{redis_port}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-bench-")))
        config_path = workdir / "servers.yaml"
        _write_config(config_path)
        bench_env = _bench_env(redis_base, config_path, tag)
        overrides = _parse_overrides(args.conf)
        if overrides:
            bench_env["BENCH_CELERY_CONF"] = json.dumps(overrides)
        # mcpq.worker.celery builds its app from MCPQ_* at import: set them before importing it.
        os.environ.update(bench_env)
        from bench.app import noop
        from mcpq.producer.embedded_redis import EmbeddedRedis
        from mcpq.producer.queue import ToolQueue
        from mcpq.worker.celery import app
        from mcpq.worker.contract.settings import Settings

        settings = Settings.from_env()
        if app.conf.broker_url != settings.broker_url:
            raise RuntimeError(
                "mcpq.worker.celery.app was built before this run set MCPQ_BROKER_URL "
                f"({app.conf.broker_url!r} != {settings.broker_url!r}): run bench.latency as a program"
            )
        redis_proc: EmbeddedRedis | None = None
        if redis_port is not None:
            redis_proc = stack.enter_context(EmbeddedRedis(port=redis_port))
            if redis_proc.process is not None:
                # Its own process group: Ctrl-C in the terminal reaches this process
                # only, and the cleanup below stops worker, then Redis, in order.
                with contextlib.suppress(OSError):
                    os.setpgid(redis_proc.process.pid, redis_proc.process.pid)
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        if args.redis_url:
            stack.callback(_drop_keys, settings.redis_url, f"{settings.key_prefix}*")
            stack.callback(_drop_keys, settings.broker_url, f"*{settings.queue}*")
        stack.callback(_no_backend_retries_after_interrupt, app)

        worker_env = {
            **os.environ,
            **bench_env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        if args.timeline == 0:
            worker_env["BENCH_INSTRUMENT"] = "0"
        report["celery_overrides"] = overrides
        report["worker"] = {"pool": args.pool, "concurrency": args.concurrency}
        worker = WorkerProcess(worker_env, settings.queue, args.concurrency, args.pool)
        stack.callback(worker.stop)
        worker.start()
        _wait_for_worker(app, worker)
        print(f"worker up (pid {worker.pid}); connecting the direct client", file=sys.stderr)

        direct = DirectClient()
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
            if "mcpq.worker.demo_server" in " ".join(_cmdline(child)):
                meter.add("worker's stdio server", child.pid)
            elif "celery" in " ".join(_cmdline(child)):
                meter.add("worker's pool child", child.pid)
        for pid in direct.server_pids:
            meter.add("direct's stdio server", pid)
        if redis_proc is not None and redis_proc.process is not None:
            meter.add("redis", redis_proc.process.pid)

        samples: dict[str, list[float]] = {p: [] for p in PATHS}
        rounds = max(1, min(args.rounds, args.calls))
        sizes = [args.calls // rounds + (1 if i < args.calls % rounds else 0) for i in range(rounds)]
        for i, size in enumerate(sizes):
            order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
            print(f"round {i + 1}/{rounds}: {size} calls per path, order {', '.join(order)}", file=sys.stderr)
            for path in order:
                with meter.measure(path):
                    samples[path] += runners[path](size)

        report["protocol"] = {
            "direct": direct.protocol_version,
            "mcpq": next((s.get("protocol_version") for s in tq.servers() if s["name"] == SERVER), None),
        }
        report["results"] = {p: summarize(samples[p]) for p in PATHS}
        report["mcpq_execution_time_ms"] = summarize(exec_ms)
        report["cpu_ms_per_call"] = meter.per_call_ms({p: len(samples[p]) for p in PATHS})

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


def _check_redis(url: str) -> None:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
            client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"bench.latency: cannot reach Redis at {url}: {exc}") from None


def _drop_keys(url: str, pattern: str) -> None:
    """On a shared Redis, remove this run's keys (its own key prefix and queue name only)."""
    import redis

    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url, socket_timeout=2.0) as client:
        keys = list(client.scan_iter(match=pattern, count=500))
        if keys:
            client.delete(*keys)


def _no_backend_retries_after_interrupt(app: Any) -> None:
    """After Ctrl-C, a result still pending unsubscribes when it is garbage collected,
    which is after Redis is stopped: Celery would retry that for about 20 s, then
    complain. Nobody waits for it any more, so skip it."""
    if _interrupted:
        with contextlib.suppress(Exception):
            backend = app.backend
            backend._transport_options["retry_policy"] = {"max_retries": 0}
            backend.remove_pending_result = lambda result: result


def _wait_for_worker(app: Any, worker: WorkerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"the worker exited at start:\n{worker.log_tail()}")
        # By name: on a shared Redis other mcpq workers would answer a broadcast ping.
        if app.control.ping(destination=[worker.name], timeout=0.5):
            return
    raise RuntimeError(f"the worker did not answer a ping within {timeout:g}s:\n{worker.log_tail()}")


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
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--calls and --rounds must be >= 1, --warmup >= 0")

    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
