"""Time from ``mcpq worker`` start to the first call served, and where that time goes.

    python -m bench.startup [--runs 5] [--servers 2] [--json FILE]

Each run starts the console script a user runs, ``mcpq worker`` (default
options: threads pool, ``-c`` 32, ``--loglevel info``; it checks the config,
then execs ``python -m celery -A mcpq.worker worker ...``), against a private
redis-server emptied before every start (a first start: no tool map, no
remembered protocol versions). ``--servers`` 1, 2 or 3 configures the bundled
demo server over stdio, plus Streamable HTTP, plus legacy SSE (the HTTP and SSE
servers are started once, before the runs, and are not timed).

Every line the worker prints is timestamped as it arrives on its stdout
(``PYTHONUNBUFFERED=1``), or with its own timestamp when it is an earlier
Celery log line (millisecond resolution; lines can arrive in bursts on a busy
machine), so each run splits into:

- the CLI: ``mcpq`` imports, config load and budget check, up to its
  ``mcpq worker: N servers`` line (then it execs Celery: a second interpreter);
- Celery: interpreter, imports and app, up to the banner; broker connection
  (``Connected to``); mingle (``mingle: all alone``); ``ready.``;
- mcpq's warm-up (``worker_ready`` -> connect + discovery per server, logged as
  ``mcpq: server 'x' offers N tools``);
- the first call.

Two ways of making the first call, each on its own fresh worker per run:

- **queued at start**: the call (``ToolQueue.submit`` + ``result``, which is
  what ``ToolQueue.call`` does, waited on in short slices to notice a worker
  that died) right after the process is started, so the message waits in the
  queue until the worker consumes (timed: process start -> result);
- **after warm-up**: the call is made once every server has been discovered
  (timed: submit -> result), one call per server, then ``--steady`` more calls
  to the stdio server for the steady-state latency.

Before the runs, the imports alone: ``python -c "import mcpq.worker.tasks"`` (and
``pass``, ``import mcpq.producer.cli``, ``import mcpq.worker.demo_server``: what a stdio
server start costs) wall time, and ``python -X importtime`` summarized by
top-level package.

Experiment: ``--worker-args='-- --without-mingle'`` passes arguments on to
``mcpq worker`` (Celery's own options only after ``--``: the command's option
parser rejects them otherwise).

Every process started here is stopped on exit, error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.environment import (
    REPO_ROOT,
    bench_env,
    child_env,
    free_port,
    git_state,
    load_mcpq,
    machine_info,
    stdio_server,
    write_config,
)
from bench.harness import DemoServerProcess, WorkerProcess, no_backend_retries, start_redis
from bench.runner import add_json_option, run_and_report

# Nothing from producer/ or worker/ at module level (see bench/environment.py).

STDIO, HTTP, SSE = "start-stdio", "start-http", "start-sse"
ECHO = {"text": "x"}
FIRST_CALL_WAIT = 180.0
START_TIMEOUT = 180.0

#: Log line -> event name. The first match of each event counts.
EVENTS: list[tuple[str, re.Pattern[str]]] = [
    ("cli", re.compile(r"^mcpq worker: \d+ servers")),
    ("banner", re.compile(r"-------------- \S+@\S+ v\d")),
    ("connected", re.compile(r"Connected to \w+://")),
    ("mingle_start", re.compile(r"mingle: searching for neighbors")),
    ("mingle_done", re.compile(r"mingle: (all alone|sync with)")),
    ("ready", re.compile(r"\S+@\S+ ready\.")),
    ("received", re.compile(r"Task mcpq\.call_tool\[[^\]]+\] received")),
    ("succeeded", re.compile(r"Task mcpq\.call_tool\[[^\]]+\] succeeded")),
]
OFFERS = re.compile(r"mcpq: server '([^']+)' offers (\d+) tools")
NOT_REACHABLE = re.compile(r"mcpq: server '([^']+)' not reachable yet")
TASK_SECONDS = re.compile(r"Task mcpq\.call_tool\[[^\]]+\] succeeded in ([0-9.]+)s")


CELERY_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def _logged_at(line: str, wall_offset: float) -> float | None:
    """The time.monotonic() of a Celery log line's own timestamp (local time, ms), if it has one."""
    m = CELERY_STAMP.match(line)
    if m is None:
        return None
    try:
        wall = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None
    return wall - wall_offset


class TimedWorker(WorkerProcess):
    """``mcpq worker`` with every output line timestamped on arrival (time.monotonic())."""

    def __init__(self, env: dict[str, str], queue: str, argv: list[str]) -> None:
        """``env``: its environment; ``queue``: the queue (of ``env``) it serves; ``argv``:
        the ``mcpq worker`` command line, run instead of ``WorkerProcess``'s own."""
        super().__init__(env, queue, 0)
        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.started_at = 0.0
        self.wall_offset = 0.0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> TimedWorker:
        self.wall_offset = time.time() - time.monotonic()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in proc.stdout:
                now = time.monotonic()
                log.write(raw)
                text = raw.decode(errors="replace").rstrip("\n")
                logged = _logged_at(text, self.wall_offset)
                # A log record's own time, when it has one: on a busy machine lines
                # can reach this reader in bursts, long after they were written.
                at = min(now, logged) if logged is not None and logged > self.started_at else now
                with self._cond:
                    self.lines.append((at, text))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = START_TIMEOUT) -> float:
        """Wait until ``count`` lines matched ``pattern``; the arrival time of the last one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [t for t, line in self.lines if pattern.search(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"worker: no {count}x {pattern.pattern!r} "
                        f"({'exited' if not self.alive() else 'timed out'}):\n{self.log_tail()}"
                    )
                self._cond.wait(0.1)

    def log_tail(self, n: int = 4000) -> str:
        with self._cond:
            text = "\n".join(line for _, line in self.lines)
        return text[-n:]

    def events(self) -> dict[str, float]:
        """Seconds from process start to the first line of each event, and per server warm-up."""
        out: dict[str, float] = {}
        with self._cond:
            lines = list(self.lines)
        for t, line in lines:
            for name, pattern in EVENTS:
                if name not in out and pattern.search(line):
                    out[name] = t - self.started_at
            m = OFFERS.search(line)
            if m and f"warm:{m.group(1)}" not in out:
                out[f"warm:{m.group(1)}"] = t - self.started_at
            m = TASK_SECONDS.search(line)
            if m and "task_seconds" not in out:
                out["task_seconds"] = float(m.group(1))
        return out

    def problems(self) -> list[str]:
        with self._cond:
            return [
                line
                for _, line in self.lines
                if NOT_REACHABLE.search(line) or "ERROR" in line or "CRITICAL" in line or "Traceback" in line
            ]


# -- imports alone --------------------------------------------------------------------------


def _time_python(code: str, env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True)
        out.append(time.perf_counter() - t0)
    return out


def importtime_summary(env: dict[str, str], module: str, top: int = 12) -> dict[str, Any]:
    """``python -X importtime -c 'import module'``: self time summed by top-level package."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    by_root: Counter[str] = Counter()
    heaviest: list[tuple[int, str]] = []
    total = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        self_us, name = int(m.group(1)), m.group(4)
        total += self_us
        by_root[name.split(".")[0]] += self_us
        heaviest.append((self_us, name))
    heaviest.sort(reverse=True)
    return {
        "module": module,
        "total_ms": total / 1000,
        "by_package_ms": {k: v / 1000 for k, v in by_root.most_common(top)},
        "heaviest_modules_ms": {name: us / 1000 for us, name in heaviest[:top]},
    }


# -- one run ----------------------------------------------------------------------------------


def _flush(redis_base: str) -> None:
    import redis

    with redis.Redis.from_url(f"{redis_base}/0") as client:
        client.flushall()


def _start_worker(
    argv: list[str], env: dict[str, str], queue: str, stack: contextlib.ExitStack
) -> TimedWorker:
    worker = TimedWorker(env, queue, argv)
    stack.callback(worker.stop)
    return worker.start()


def _wait_result(handle: Any, worker: TimedWorker, timeout: float = FIRST_CALL_WAIT) -> Any:
    from mcpq.worker.contract.errors import MCPTimeoutError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return handle.result(0.25)
        except MCPTimeoutError:
            if not worker.alive():
                raise RuntimeError(f"the worker exited before answering:\n{worker.log_tail()}") from None
            if time.monotonic() > deadline:
                raise


def run_queued(
    tq: Any, argv: list[str], env: dict[str, str], queue: str, servers: list[str]
) -> dict[str, Any]:
    """The first call submitted right after the process started."""
    with contextlib.ExitStack() as stack:
        worker = _start_worker(argv, env, queue, stack)
        t_submit = time.monotonic()
        # ToolQueue.call is submit + result(wait); waiting in short slices notices a worker
        # that exited at start (a bad option, say) at once instead of after FIRST_CALL_WAIT.
        handle = tq.submit("echo", dict(ECHO), server=STDIO)
        result = _wait_result(handle, worker)
        t_result = time.monotonic()
        if not result.success or result.text != "x":
            raise RuntimeError(f"first call failed: {result}\n{worker.log_tail()}")
        # The warm-up may still be running, and Celery logs the task's end after
        # storing its result: wait for both so the events are complete.
        worker.wait_for(OFFERS, count=len(servers))
        worker.wait_for(EVENTS[7][1])  # succeeded
        events = worker.events()
        events["submit"] = t_submit - worker.started_at
        events["result"] = t_result - worker.started_at
        problems = worker.problems()
        worker.stop()
    return {"events": events, "problems": problems, "execution_time_ms": result.execution_time_ms}


def run_warm(
    tq: Any, argv: list[str], env: dict[str, str], queue: str, servers: list[str], steady: int
) -> dict[str, Any]:
    """The first call per server once the warm-up has discovered every server; then steady calls."""
    with contextlib.ExitStack() as stack:
        worker = _start_worker(argv, env, queue, stack)
        worker.wait_for(EVENTS[5][1])  # ready
        worker.wait_for(OFFERS, count=len(servers))
        first: dict[str, float] = {}
        for server in servers:
            t0 = time.monotonic()
            result = tq.call("echo", dict(ECHO), server=server, wait=FIRST_CALL_WAIT)
            first[server] = time.monotonic() - t0
            if not result.success or result.text != "x":
                raise RuntimeError(f"first call to {server} failed: {result}\n{worker.log_tail()}")
        later: list[float] = []
        for _ in range(steady):
            t0 = time.monotonic()
            result = tq.call("echo", dict(ECHO), server=STDIO, wait=60)
            later.append(time.monotonic() - t0)
            if not result.success:
                raise RuntimeError(f"steady call failed: {result}")
        events = worker.events()
        problems = worker.problems()
        worker.stop()
    return {"events": events, "first_call": first, "steady": later, "problems": problems}


def _write_config(path: Path, servers: int, http_port: int, sse_port: int) -> list[str]:
    """servers.yaml with the first ``servers`` of stdio, HTTP and SSE; their names."""
    doc: dict[str, dict[str, Any]] = {
        STDIO: stdio_server(),
        HTTP: {"transport": "http", "url": f"http://127.0.0.1:{http_port}/mcp"},
        SSE: {"transport": "sse", "url": f"http://127.0.0.1:{sse_port}/sse"},
    }
    chosen = list(doc)[:servers]
    write_config(path, {k: doc[k] for k in chosen})
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "runs": args.runs,
        "machine": machine_info(),
        "git": git_state(),
    }
    mcpq = shutil.which("mcpq", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if mcpq is None:
        raise SystemExit("bench.startup: no `mcpq` console script next to this Python (pip install -e .)")
    with contextlib.ExitStack() as stack:
        redis_port, http_port, sse_port = free_port(), free_port(), free_port()
        redis_base = f"redis://127.0.0.1:{redis_port}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-startup-")))
        config_path = workdir / "servers.yaml"
        servers = _write_config(config_path, args.servers, http_port, sse_port)
        report["servers"] = servers
        run_env = bench_env(redis_base, config_path, tag)
        os.environ.update(run_env)  # the processes started below get it, the timed ones too
        env = child_env()

        print("timing imports alone", file=sys.stderr)
        report["imports"] = {
            label: _time_python(code, env, args.runs)
            for label, code in (
                ("python -c pass", "pass"),
                ("import mcpq.worker.tasks", "import mcpq.worker.tasks"),
                ("import mcpq.producer.cli", "import mcpq.producer.cli"),
                ("import mcpq.worker.demo_server", "import mcpq.worker.demo_server"),
            )
        }
        report["importtime"] = importtime_summary(env, "mcpq.worker.tasks")

        # Only after the import timings: this process's imports would warm the file cache.
        app, settings = load_mcpq(run_env, "bench.startup")
        from mcpq.producer.queue import ToolQueue

        start_redis(stack, redis_port)
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        stack.callback(no_backend_retries, app, always=True)
        for name, transport, port in ((HTTP, "http", http_port), (SSE, "sse", sse_port)):
            if name in servers:
                server = DemoServerProcess(env, transport, port)
                stack.callback(server.stop)
                server.start()

        argv = [mcpq, "worker", *args.worker_args]
        report["command"] = " ".join(["mcpq", "worker", *args.worker_args])
        queued: list[dict[str, Any]] = []
        warm: list[dict[str, Any]] = []
        for i in range(args.runs):
            _flush(redis_base)
            queued.append(run_queued(tq, argv, env, settings.queue, servers))
            q = queued[-1]["events"]
            print(
                f"run {i + 1}/{args.runs} queued at start: first result {q['result'] * 1000:.0f} ms "
                f"(ready {q.get('ready', float('nan')) * 1000:.0f} ms)",
                file=sys.stderr,
            )
            _flush(redis_base)
            warm.append(run_warm(tq, argv, env, settings.queue, servers, args.steady))
            w = warm[-1]
            print(
                f"run {i + 1}/{args.runs} after warm-up: first call "
                + ", ".join(f"{s} {v * 1000:.0f} ms" for s, v in w["first_call"].items()),
                file=sys.stderr,
            )
        report["queued"] = queued
        report["warm"] = warm
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


# -- output ---------------------------------------------------------------------------------


def _med(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return f"{'-':>8} {'-':>8} {'-':>8}"
    return f"{statistics.median(vals) * 1000:8.0f} {min(vals) * 1000:8.0f} {max(vals) * 1000:8.0f}"


NAN = float("nan")


def _phases(run: dict[str, Any], servers: list[str]) -> dict[str, float]:
    """Named durations (seconds) of one run; a phase whose log line is missing is left out."""
    ev: dict[str, float] = run["events"]
    out: dict[str, float] = {}

    def put(key: str, *names: str, minus: str | None = None) -> None:
        if all(n in ev for n in names) and (minus is None or minus in ev):
            out[key] = max(ev[n] for n in names) - (ev[minus] if minus else 0.0)

    put("cli", "cli")
    put("exec", "banner", minus="cli")
    put("connect", "connected", minus="banner")
    put("mingle", "mingle_done", minus="connected")
    put("startup_rest", "ready", minus="mingle_done" if "mingle_done" in ev else "connected")
    put("ready", "ready")
    for server in servers:
        put(f"warm:{server}", f"warm:{server}", minus="ready")
    put("all_discovered", *(f"warm:{s}" for s in servers))
    for server, seconds in run.get("first_call", {}).items():
        out[f"first:{server}"] = seconds
    if run.get("steady"):
        out["steady"] = statistics.median(run["steady"])
    if "all_discovered" in out and servers[0] in run.get("first_call", {}):
        out["warm_total"] = out["all_discovered"] + run["first_call"][servers[0]]
    put("result", "result")
    put("ready_to_result", "result", minus="ready")
    put("received_to_result", "result", minus="received")
    if "task_seconds" in ev:
        out["task_seconds"] = ev["task_seconds"]
    if "execution_time_ms" in run:
        out["execution"] = run["execution_time_ms"] / 1000
    return out


def _rows(
    servers: list[str], both: list[dict[str, Any]], queued: list[dict[str, Any]], warm: list[dict[str, Any]]
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(phase key, label, the runs it is taken from): start-up phases from every start."""
    rows = [
        ("cli", "CLI: imports, config check (-> 'mcpq worker:')", both),
        ("exec", "  exec celery: imports, app (-> banner)", both),
        ("connect", "  connect to the broker (-> 'Connected to')", both),
        ("mingle", "  mingle (-> 'mingle: all alone')", both),
        ("startup_rest", "  rest of start-up (-> 'ready.')", both),
        ("ready", "(b) process start -> 'ready.'", both),
    ]
    rows += [(f"warm:{s}", f"(c) warm-up {s}: ready -> 'offers N tools'", warm) for s in servers]
    rows.append(("all_discovered", "    process start -> every server discovered", warm))
    rows += [(f"first:{s}", f"(d) first call after warm-up, {s}: submit -> result", warm) for s in servers]
    rows += [
        ("steady", "    steady state: later calls to the stdio server", warm),
        ("warm_total", "after warm-up: process start -> first result", warm),
        ("result", "queued at start: process start -> first result", queued),
        ("ready_to_result", "  'ready.' -> first result", queued),
        ("received_to_result", "  'Task received' (log) -> first result", queued),
        ("task_seconds", "  the task itself (Celery's 'succeeded in')", queued),
        ("execution", "  its execution_time_ms (router: connect + call)", queued),
        (f"warm:{servers[0]}", f"  that run's warm-up of {servers[0]}: ready -> 'offers'", queued),
    ]
    return rows


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    servers: list[str] = report["servers"]
    lines = [
        f"mcpq worker start-up: `{report['command']}` with {len(servers)} server(s) "
        f"({', '.join(servers)}), {report['runs']} runs, medians (min, max) in ms",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, load {m['loadavg_start'][0]:.2f} -> "
        f"{m['loadavg_end'][0]:.2f}; code {report['git']}",
        "",
        "(a) imports alone, wall time of a fresh interpreter:",
        f"  {'':<48} {'median':>8} {'min':>8} {'max':>8}",
    ]
    for label, values in report["imports"].items():
        lines.append(
            f"  {'python -c ' + repr(label) if label != 'python -c pass' else label:<48} {_med(values)}"
        )
    it = report["importtime"]
    lines.append(
        f"  python -X importtime -c 'import {it['module']}': {it['total_ms']:.0f} ms of imports (self times "
        "summed); by top-level package:"
    )
    lines.append("    " + ", ".join(f"{k} {v:.0f}" for k, v in it["by_package_ms"].items()))
    lines.append("    heaviest single modules (self): " + ", ".join(
        f"{k} {v:.0f}" for k, v in list(it["heaviest_modules_ms"].items())[:8]
    ))  # fmt: skip

    queued, warm = report["queued"], report["warm"]
    both = queued + warm
    rows: list[tuple[str, list[float]]] = [
        (label, [_phases(r, servers).get(key, NAN) for r in runs])
        for key, label, runs in _rows(servers, both, queued, warm)
    ]
    lines += ["", f"  {'phase':<58} {'median':>8} {'min':>8} {'max':>8}"]
    lines += [f"  {label:<58} {_med(values)}" for label, values in rows]
    lines.append(
        f"  (start-up rows from all {len(both)} starts. The warm-up discovers every server at once and logs "
        "them together, so each (c) row is the slowest server's time; 'import mcpq.worker.demo_server' above"
        " is most of what starting the stdio server costs. 'after warm-up: process start -> first result' is "
        "when the last server was discovered plus the first call: a caller who waited exactly that long)"
    )
    problems = [p for r in both for p in r["problems"]]
    lines.append(f"worker log problems (errors, unreachable servers): {len(problems)}")
    lines += [f"  {p[:200]}" for p in problems[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh starts per way of calling (default 5)")
    parser.add_argument(
        "--servers",
        type=int,
        choices=[1, 2, 3],
        default=2,
        help="1 stdio; 2 + Streamable HTTP; 3 + SSE (default 2)",
    )
    parser.add_argument(
        "--steady", type=int, default=20, help="calls after the first, for the steady state (default 20)"
    )
    parser.add_argument(
        "--worker-args",
        default="",
        metavar="ARGS",
        help="experiment: more arguments for `mcpq worker` (one string, shell-split); Celery's own "
        "options go after '--', e.g. --worker-args='-- --without-mingle'",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    args.worker_args = shlex.split(args.worker_args)
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
