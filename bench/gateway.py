"""``mcpq gateway`` against ``AsyncToolQueue``, in one run: sequential latency and 200 sessions.

    python -m bench.gateway [--calls 300] [--sessions 200] [--per-session 10] [--rounds 3]
                            [--modes legacy,2026-07-28] [--json FILE]

1. latency: ``--calls`` sequential ``echo`` calls per path, after a warm-up, in
   ``--rounds`` interleaved blocks (gateway legacy / gateway 2026-07-28 /
   ``await AsyncToolQueue.call``, the order rotating each round) so drift hits every
   path alike: one SDK ``mcp.Client`` per mode over Streamable HTTP to the gateway, one
   ``AsyncToolQueue`` in this process. Target: the gateway adds at most 2 ms (median).
2. concurrency: per round and per mode, ``--sessions`` SDK clients (each its own
   ``mcp.Client`` and HTTP connection pool, all opened before timing) call concurrently,
   ``--per-session`` calls each; against the same total through one ``AsyncToolQueue``
   with ``--sessions`` concurrent coroutines. Target: gateway calls/s at least 0.7x the
   queue's, no error; the gateway's RSS (VmRSS) before, with the sessions open, after
   the calls and after they closed.

Both parts measure the CPU seconds of every process per path (this one, the gateway,
the worker and its stdio server, redis): on 2 cores the 200 SDK sessions of the client
side compete with the gateway for CPU, and the report says where the time goes.

A private redis-server carries broker (db 0), results (db 1) and state (db 2); one
threads worker (16 slots) runs the stdio demo server; ``mcpq gateway`` runs as a
subprocess with the run's MCPQ_* environment and a bearer token. Every process started
here is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import psutil

from bench.cpu import CpuMeter, cpu_seconds, per_call_ms
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
from bench.harness import ChildProcess, WorkerProcess, no_backend_retries, start_redis, wait_for_worker
from bench.runner import add_json_option, run_and_report
from bench.stats import percentile, summarize

SERVER = "bench-stdio"
TOOL = "echo"
CALL_TIMEOUT = 120.0
WORKER_CONCURRENCY = 16
WARMUP_CALLS = 20
MODES = ("legacy", "2026-07-28")
QUEUE_PATH = "AsyncToolQueue"
LATENCY_TARGET_MS = 2.0
CONCURRENCY_TARGET = 0.7
MCPQ = str(Path(sys.executable).with_name("mcpq"))
#: CPU meter names: this process, the gateway, the worker with its stdio server, redis.
PROCESSES = ("bench", "gateway", "worker", "redis")


def gateway_path(mode: str) -> str:
    return f"gateway {mode}"


def bare_path(mode: str) -> str:
    return f"bare SDK {mode}"


class BareServer(ChildProcess):
    """``bench.mcp_echo_server``: the SDK's own server answering at once (the MCP stack's round trip)."""

    grace = 5.0

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        super().__init__([sys.executable, "-m", "bench.mcp_echo_server", str(self.port)], env, "bare-mcp")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 30.0) -> Self:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the bare MCP server exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the bare MCP server was not up within {timeout:g}s:\n{self.log_tail()}")


class GatewayProcess(ChildProcess):
    """``mcpq gateway --port P`` with this run's environment and ``MCPQ_GATEWAY_TOKEN``."""

    grace = 10.0

    def __init__(self, env: dict[str, str], token: str, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.token = token
        super().__init__([MCPQ, "gateway", "--port", str(self.port)], env, "gateway")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 60.0) -> Self:
        """Start it and return once ``/healthz`` lists the fleet's tools."""
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the gateway exited at start:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                reply = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2)
                if reply.status_code == 200 and reply.json().get("tools", 0) > 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"the gateway was not ready within {timeout:g}s:\n{self.log_tail()}")

    def rss_mib(self) -> float:
        """Its resident memory now, MiB (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.asynccontextmanager
async def plain_client(url: str, mode: str) -> AsyncIterator[Any]:
    """An SDK ``mcp.Client`` on ``url`` over Streamable HTTP, no token."""
    from mcp import Client

    async with Client(url, mode=mode) as client:  # type: ignore[arg-type]
        yield client


@contextlib.asynccontextmanager
async def mcp_client(gateway: GatewayProcess, mode: str) -> AsyncIterator[Any]:
    """An SDK ``mcp.Client`` on the gateway over Streamable HTTP, with its own HTTP client."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {gateway.token}"}
    async with (
        create_mcp_http_client(headers=headers) as http,
        Client(streamable_http_client(gateway.url, http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client


def gateway_ok(result: Any, text: str) -> bool:
    """Whether a CallToolResult is the echo of ``text``."""
    content = getattr(result, "content", None) or []
    return not result.is_error and len(content) == 1 and getattr(content[0], "text", None) == text


def queue_ok(result: Any, text: str) -> bool:
    return bool(result.success) and result.text == text


def tree_source(pid: int, name: str) -> Callable[[], dict[str, float]]:
    """CPU seconds of ``pid`` and its descendants (the worker and its stdio server), as ``name``."""
    root = psutil.Process(pid)

    def source() -> dict[str, float]:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += cpu_seconds(proc)
        return {name: total}

    return source


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "calls": args.calls,
        "sessions": args.sessions,
        "per_session": args.per_session,
        "rounds": args.rounds,
        "modes": list(args.modes),
        "machine": machine_info(),
        "git": git_state(),
    }
    with contextlib.ExitStack() as stack:
        redis_port = free_port()
        redis_base = f"redis://127.0.0.1:{redis_port}"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-bench-")))
        config_path = workdir / "servers.yaml"
        write_config(config_path, {SERVER: stdio_server()})
        env = bench_env(redis_base, config_path, tag)
        app, settings = load_mcpq(env, "bench.gateway")
        from mcpq.producer.aio import AsyncToolQueue

        redis_proc = start_redis(stack, redis_port)
        stack.callback(no_backend_retries, app)
        worker = WorkerProcess(child_env(), settings.queue, WORKER_CONCURRENCY)
        stack.callback(worker.stop)
        worker.start()
        wait_for_worker(app, worker)
        gateway = GatewayProcess(child_env({"MCPQ_GATEWAY_TOKEN": f"bench-{tag}"}), f"bench-{tag}")
        stack.callback(gateway.stop)
        gateway.start()
        bare = BareServer(child_env())
        stack.callback(bare.stop)
        bare.start()
        print(f"worker {worker.pid}, gateway {gateway.pid}, bare MCP server {bare.pid} up", file=sys.stderr)
        report["worker"] = {"pool": "threads", "concurrency": WORKER_CONCURRENCY}

        meter = CpuMeter(categories=PROCESSES)
        meter.add("bench", os.getpid())
        meter.add("gateway", gateway.pid)
        meter.add_source(tree_source(worker.pid, "worker"))
        if redis_proc.process is not None:
            meter.add("redis", redis_proc.process.pid)

        async def both() -> None:
            async with AsyncToolQueue(settings) as aq:
                report["latency"] = await _latency(args, aq, gateway, bare, meter)
                report["concurrency"] = await _concurrency(args, aq, gateway, meter)

        asyncio.run(both())
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


async def _latency(
    args: argparse.Namespace, aq: Any, gateway: GatewayProcess, bare: BareServer, meter: CpuMeter
) -> dict[str, Any]:
    paths = [*(gateway_path(m) for m in args.modes), QUEUE_PATH, *(bare_path(m) for m in args.modes)]
    samples: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, dict[str, float]] = {p: {} for p in paths}
    wrong = 0

    async with contextlib.AsyncExitStack() as clients:
        steps: dict[str, Callable[[], Awaitable[bool]]] = {}
        for mode in args.modes:
            client = await clients.enter_async_context(mcp_client(gateway, mode))

            async def via_gateway(client: Any = client) -> bool:
                return gateway_ok(await client.call_tool(TOOL, {"text": "x"}), "x")

            steps[gateway_path(mode)] = via_gateway
            bare_client = await clients.enter_async_context(plain_client(bare.url, mode))

            async def via_bare(client: Any = bare_client) -> bool:
                return gateway_ok(await client.call_tool(TOOL, {"text": "x"}), "x")

            steps[bare_path(mode)] = via_bare

        async def via_queue() -> bool:
            return queue_ok(await aq.call(TOOL, {"text": "x"}, server=SERVER, wait=CALL_TIMEOUT), "x")

        steps[QUEUE_PATH] = via_queue

        async def block(path: str, n: int, into: list[float] | None) -> None:
            nonlocal wrong
            step = steps[path]
            for _ in range(n):
                t0 = time.perf_counter()
                ok = await step()
                elapsed = (time.perf_counter() - t0) * 1000
                wrong += not ok
                if into is not None:
                    into.append(elapsed)

        for path in paths:
            await block(path, WARMUP_CALLS, None)
        wrong = 0
        per_round = -(-args.calls // args.rounds)
        done = 0
        for r in range(args.rounds):
            n = min(per_round, args.calls - done)
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            print(f"latency round {r + 1}/{args.rounds}: {n} calls per path", file=sys.stderr)
            for path in order:
                with meter.measure(cpu[path]):
                    await block(path, n, samples[path])
            done += n

    summaries = {p: summarize(s) | {"p95": percentile(sorted(s), 95)} for p, s in samples.items()}
    base = summaries[QUEUE_PATH]["median"]
    return {
        "ms": summaries,
        "added_ms": {gateway_path(m): summaries[gateway_path(m)]["median"] - base for m in args.modes},
        "added_p95_ms": {
            gateway_path(m): summaries[gateway_path(m)]["p95"] - summaries[QUEUE_PATH]["p95"]
            for m in args.modes
        },
        # What the MCP stack alone (the SDK's client and server) adds to a call's latency.
        "mcp_round_trip_ms": {m: summaries[bare_path(m)]["median"] for m in args.modes},
        "cpu_ms_per_call": per_call_ms(cpu, {p: len(s) for p, s in samples.items()}),
        "wrong_results": wrong,
        "target_added_ms": LATENCY_TARGET_MS,
    }


async def _concurrency(
    args: argparse.Namespace, aq: Any, gateway: GatewayProcess, meter: CpuMeter
) -> dict[str, Any]:
    total = args.sessions * args.per_session
    paths = [*(gateway_path(m) for m in args.modes), QUEUE_PATH]
    rates: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, dict[str, float]] = {p: {} for p in paths}
    calls: dict[str, int] = dict.fromkeys(paths, 0)
    errors: dict[str, int] = dict.fromkeys(paths, 0)
    first_errors: list[str] = []
    #: The gateway's VmRSS, MiB, at each step of this part, in order.
    rss: list[tuple[str, float]] = [("before any session", gateway.rss_mib())]
    open_s: dict[str, float] = {}

    def failed(path: str, what: str) -> None:
        errors[path] += 1
        if len(first_errors) < 5:
            first_errors.append(f"{path}: {what}")

    async def via_gateway(path: str, clients: list[Any]) -> None:
        async def session(i: int, client: Any) -> None:
            for j in range(args.per_session):
                text = f"s{i}-{j}"
                try:
                    result = await client.call_tool(TOOL, {"text": text})
                except Exception as exc:
                    failed(path, repr(exc))
                    continue
                if not gateway_ok(result, text):
                    failed(path, repr(result)[:300])

        with meter.measure(cpu[path]):
            t0 = time.perf_counter()
            await asyncio.gather(*(session(i, c) for i, c in enumerate(clients)))
            elapsed = time.perf_counter() - t0
        rates[path].append(total / elapsed)
        calls[path] += total

    async def via_queue() -> None:
        async def coroutine(i: int) -> None:
            for j in range(args.per_session):
                text = f"q{i}-{j}"
                try:
                    result = await aq.call(TOOL, {"text": text}, server=SERVER, wait=CALL_TIMEOUT)
                except Exception as exc:
                    failed(QUEUE_PATH, repr(exc))
                    continue
                if not queue_ok(result, text):
                    failed(QUEUE_PATH, repr(result)[:300])

        with meter.measure(cpu[QUEUE_PATH]):
            t0 = time.perf_counter()
            await asyncio.gather(*(coroutine(i) for i in range(args.sessions)))
            elapsed = time.perf_counter() - t0
        rates[QUEUE_PATH].append(total / elapsed)
        calls[QUEUE_PATH] += total

    async with contextlib.AsyncExitStack() as opened:
        sessions: dict[str, list[Any]] = {}
        for mode in args.modes:
            path = gateway_path(mode)
            print(f"opening {args.sessions} {mode} sessions", file=sys.stderr)
            t0 = time.perf_counter()
            sessions[path] = [
                await opened.enter_async_context(mcp_client(gateway, mode)) for _ in range(args.sessions)
            ]
            open_s[path] = time.perf_counter() - t0
            rss.append((f"{args.sessions} {mode} sessions opened", gateway.rss_mib()))
        with profiled(args.profile, {"gateway": gateway.pid, "bench": os.getpid()}):
            for r in range(args.rounds):
                order = paths[r % len(paths) :] + paths[: r % len(paths)]
                for path in order:
                    print(f"concurrency round {r + 1}/{args.rounds}: {path}", file=sys.stderr)
                    if path == QUEUE_PATH:
                        await via_queue()
                    else:
                        await via_gateway(path, sessions[path])
                rss.append((f"after round {r + 1}", gateway.rss_mib()))
    rss.append(("every session closed", gateway.rss_mib()))

    medians = {p: summarize(v)["median"] for p, v in rates.items()}
    return {
        "total_calls_per_round": total,
        "calls_per_s": rates,
        "median_calls_per_s": medians,
        "ratio_over_queue": {
            gateway_path(m): medians[gateway_path(m)] / medians[QUEUE_PATH] for m in args.modes
        },
        "errors": errors,
        "first_errors": first_errors,
        "sessions_open_s": open_s,
        "gateway_rss_mib": rss,
        "cpu_ms_per_call": per_call_ms(cpu, calls),
        "cpu_s_per_round": {p: {k: v / args.rounds for k, v in by.items()} for p, by in cpu.items()},
        "target_ratio": CONCURRENCY_TARGET,
    }


@contextlib.contextmanager
def profiled(into: Path | None, pids: dict[str, int]) -> Iterator[None]:
    """With ``into`` set: ``py-spy record`` (raw collapsed stacks, on-CPU samples) of each of
    ``pids`` during the block, into ``into/<name>.txt``. It slows what it samples: a run
    with a profile measures nothing else worth quoting."""
    if into is None:
        yield
        return
    spy = shutil.which("py-spy") or os.environ.get("BENCH_PY_SPY")
    if spy is None:
        raise SystemExit("--profile needs py-spy on PATH or in BENCH_PY_SPY (pip install py-spy)")
    into.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--nonblocking",
             "-o", str(into / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]  # fmt: skip
    try:
        yield
    finally:
        for proc in spies:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in spies:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cpu_line(label: str, by_name: dict[str, float]) -> str:
    parts = "  ".join(f"{name} {by_name.get(name, 0.0):6.2f}" for name in PROCESSES)
    return f"  {label:<22}{parts}   total {sum(by_name.values()):6.2f}"


def render(report: dict[str, Any]) -> str:
    lat, con = report["latency"], report["concurrency"]
    m = report["machine"]
    lines = [
        f"bench.gateway  ({report['calls']} sequential calls per path in {report['rounds']} rounds; "
        f"{report['sessions']} sessions x {report['per_session']} calls; git {report['git']})",
        f"load average start {m['loadavg_start'][0]:.2f} / end {m['loadavg_end'][0]:.2f} "
        f"(1 min), {m['cpus']} cpus",
        "",
        "sequential latency, ms: median / p95 / p99   (gateway minus AsyncToolQueue, median / p95)",
    ]
    for path, s in lat["ms"].items():
        added = ""
        if path in lat["added_ms"]:
            added = f"   {lat['added_ms'][path]:+.2f} / {lat['added_p95_ms'][path]:+.2f}"
        lines.append(f"  {path:<22}{s['median']:7.2f} / {s['p95']:6.2f} / {s['p99']:6.2f}{added}")
    lines.append(
        "  the MCP stack alone (the SDK's client and a bare SDK server answering at once): "
        + ", ".join(f"{m} {ms:.2f} ms" for m, ms in lat["mcp_round_trip_ms"].items())
    )
    lines += [
        f"  target: added median <= {lat['target_added_ms']:.0f} ms; wrong results {lat['wrong_results']}",
        "  CPU ms per call, by process:",
    ]
    lines += [_cpu_line(p, by) for p, by in lat["cpu_ms_per_call"].items()]
    lines += [
        "",
        f"concurrency: {report['sessions']} concurrent callers x {report['per_session']} calls "
        f"= {con['total_calls_per_round']} calls per round, calls/s (rounds; median)",
    ]
    for path, rates in con["calls_per_s"].items():
        ratio = con["ratio_over_queue"].get(path)
        tail = f"   ratio {ratio:.2f} (target >= {con['target_ratio']})" if ratio is not None else ""
        lines.append(
            f"  {path:<22}{', '.join(f'{r:.0f}' for r in rates)}; {con['median_calls_per_s'][path]:.0f}"
            f"   errors {con['errors'][path]}{tail}"
        )
    if con["first_errors"]:
        lines += ["  first errors:", *(f"    {e}" for e in con["first_errors"])]
    lines.append("  CPU ms per call, by process:")
    lines += [_cpu_line(p, by) for p, by in con["cpu_ms_per_call"].items()]
    lines.append("  CPU s per round, by process:")
    lines += [_cpu_line(p, by) for p, by in con["cpu_s_per_round"].items()]
    lines.append("  gateway RSS (VmRSS), MiB:")
    lines += [f"    {what:<32}{mib:7.1f}" for what, mib in con["gateway_rss_mib"]]
    lines.append(
        "  opening the sessions took "
        + ", ".join(f"{s:.1f} s ({path})" for path, s in con["sessions_open_s"].items())
    )
    return "\n".join(lines)


def _modes(value: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in value.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {value!r}")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per path (default 300)")
    parser.add_argument("--sessions", type=int, default=200, help="concurrent MCP sessions (default 200)")
    parser.add_argument(
        "--per-session", type=int, default=10, help="calls per session in the concurrency part (default 10)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each part (default 3)")
    parser.add_argument(
        "--modes",
        type=_modes,
        default=MODES,
        help=f"client modes, comma-separated (default {','.join(MODES)})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the gateway and this process during the concurrency part, into this folder",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    if min(args.calls, args.sessions, args.per_session, args.rounds) < 1:
        parser.error("--calls, --sessions, --per-session and --rounds must be at least 1")
    report = run_and_report(run, render, args)
    if report is None:
        return 130
    failed = report["latency"]["wrong_results"] or any(report["concurrency"]["errors"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
