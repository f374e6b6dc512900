"""The asyncio face against the sync one, in one run: throughput, latency, cancel.

    python -m bench.aio [--calls 10000] [--rounds 2] [--latency-calls 300] [--cancels 5] [--json FILE]

1. throughput: ``--calls`` echo calls on the stdio demo server, two ways, alternating
   for ``--rounds`` rounds: ``ToolQueue.map`` (the sync fan-out: chunk tasks) and
   ``asyncio.gather`` over ``AsyncToolQueue.call`` in one event loop. Every result is
   checked. For the async path the process's thread count is sampled every 20 ms
   (target: at most 8) and its resident memory before and after is reported.
2. latency: ``--latency-calls`` sequential calls per face, interleaved in blocks
   (``ToolQueue.call`` against ``await AsyncToolQueue.call``); target ratio <= 1.1.
3. cancel: a worker with one slot runs ``sleep`` (60 s) with progress; once the
   server's first progress arrived (the request is running there),
   ``await handle.cancel()``; then time to the ``cancelled`` result and to the
   first result of an echo submitted right after the cancel (the slot is free again).

A private redis-server carries broker (db 0), results (db 1) and state (db 2); every
process started here is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
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
from bench.harness import WorkerProcess, no_backend_retries, start_redis, wait_for_worker
from bench.runner import add_json_option, run_and_report
from bench.stats import summarize

SERVER = "bench-stdio"
CALL_TIMEOUT = 120.0
WORKER_CONCURRENCY = 16
THREAD_TARGET = 8
LATENCY_TARGET = 1.1
SLEEP_MS = 60_000


def _check(results: list[Any], texts: list[str]) -> int:
    """How many results are not the echo of their text."""
    return sum(1 for r, t in zip(results, texts, strict=True) if not r.success or r.text != t)


class ThreadSampler:
    """The most threads this process had, sampled every ``interval`` seconds on the loop."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None
        self._proc = psutil.Process()

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.num_threads())
            await asyncio.sleep(self.interval)

    def __enter__(self) -> ThreadSampler:
        self.peak = self._proc.num_threads()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self._proc.num_threads())


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "calls": args.calls,
        "rounds": args.rounds,
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
        app, settings = load_mcpq(env, "bench.aio")
        from mcpq.producer.aio import AsyncToolQueue
        from mcpq.producer.queue import ToolQueue

        start_redis(stack, redis_port)
        tq = ToolQueue(settings, app=app)
        stack.callback(tq.close)
        stack.callback(no_backend_retries, app)
        worker = WorkerProcess(child_env(), settings.queue, WORKER_CONCURRENCY)
        stack.callback(worker.stop)
        worker.start()
        one_slot = WorkerProcess(child_env(), f"{settings.queue}-one", 1, node=f"one-{tag}")
        stack.callback(one_slot.stop)
        one_slot.start()
        wait_for_worker(app, worker)
        wait_for_worker(app, one_slot)
        print(f"workers up (pids {worker.pid}, {one_slot.pid})", file=sys.stderr)
        report["worker"] = {"pool": "threads", "concurrency": WORKER_CONCURRENCY}
        report["throughput"] = _throughput(args, tq, AsyncToolQueue, settings)
        report["latency"] = _latency(args, tq, AsyncToolQueue, settings)
        report["cancel"] = _cancel(args, AsyncToolQueue, settings, f"{settings.queue}-one")
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


def _throughput(args: argparse.Namespace, tq: Any, async_queue: Any, settings: Any) -> dict[str, Any]:
    texts = [f"t{i}" for i in range(args.calls)]
    arguments = [{"text": t} for t in texts]
    # Warm both paths (sessions, schema caches, the listener).
    tq.map("echo", arguments[:200], server=SERVER, timeout=CALL_TIMEOUT)
    sync_rates: list[float] = []
    async_rates: list[float] = []
    wrong = 0
    peaks: list[int] = []
    rss_growth: list[float] = []

    async def gathered() -> tuple[float, int, float]:
        async with async_queue(settings) as aq:
            await aq.call("echo", {"text": "warm"}, server=SERVER, wait=CALL_TIMEOUT)
            rss_before = psutil.Process().memory_info().rss
            with ThreadSampler() as sampler:
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(aq.call("echo", a, server=SERVER, wait=CALL_TIMEOUT) for a in arguments)
                )
                elapsed = time.perf_counter() - started
            rss_after = psutil.Process().memory_info().rss
            nonlocal wrong
            wrong += _check(list(results), texts)
        return args.calls / elapsed, sampler.peak, (rss_after - rss_before) / 2**20

    for i in range(args.rounds):
        print(f"throughput round {i + 1}/{args.rounds}: sync map", file=sys.stderr)
        started = time.perf_counter()
        results = tq.map("echo", arguments, server=SERVER, timeout=CALL_TIMEOUT)
        sync_rates.append(args.calls / (time.perf_counter() - started))
        wrong += _check(results, texts)
        print(f"throughput round {i + 1}/{args.rounds}: asyncio.gather", file=sys.stderr)
        rate, peak, growth = asyncio.run(gathered())
        async_rates.append(rate)
        peaks.append(peak)
        rss_growth.append(growth)
    sync_median = summarize(sync_rates)["median"]
    async_median = summarize(async_rates)["median"]
    return {
        "sync_map_calls_per_s": sync_rates,
        "async_gather_calls_per_s": async_rates,
        "ratio_async_over_sync": async_median / sync_median,
        "peak_threads": max(peaks),
        "thread_target": THREAD_TARGET,
        "rss_growth_mib": rss_growth,
        "wrong_results": wrong,
    }


def _latency(args: argparse.Namespace, tq: Any, async_queue: Any, settings: Any) -> dict[str, Any]:
    sync_ms: list[float] = []
    async_ms: list[float] = []
    block = max(args.latency_calls // 5, 1)

    def sync_block(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            result = tq.call("echo", {"text": "x"}, server=SERVER, wait=CALL_TIMEOUT)
            sync_ms.append((time.perf_counter() - t0) * 1000)
            if not result.success:
                raise RuntimeError(f"sync call failed: {result}")

    async def async_block(aq: Any, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            result = await aq.call("echo", {"text": "x"}, server=SERVER, wait=CALL_TIMEOUT)
            async_ms.append((time.perf_counter() - t0) * 1000)
            if not result.success:
                raise RuntimeError(f"async call failed: {result}")

    async def interleaved() -> None:
        async with async_queue(settings) as aq:
            await async_block(aq, 20)  # warm-up
            sync_block(20)
            sync_ms.clear()
            async_ms.clear()
            done = 0
            while done < args.latency_calls:
                n = min(block, args.latency_calls - done)
                # The sync face blocks the loop here on purpose: nothing else runs meanwhile.
                sync_block(n)
                await async_block(aq, n)
                done += n

    asyncio.run(interleaved())
    sync_summary, async_summary = summarize(sync_ms), summarize(async_ms)
    return {
        "sync_ms": sync_summary,
        "async_ms": async_summary,
        "ratio_async_over_sync": async_summary["median"] / sync_summary["median"],
        "target": LATENCY_TARGET,
    }


def _cancel(args: argparse.Namespace, async_queue: Any, settings: Any, queue: str) -> dict[str, Any]:
    to_result: list[float] = []
    to_slot: list[float] = []
    may_have_run: list[bool] = []

    async def once(aq: Any) -> None:
        handle = await aq.submit(
            "sleep", {"ms": SLEEP_MS}, server=SERVER, timeout=CALL_TIMEOUT, queue=queue, progress=True
        )
        await _running_on_the_server(handle)
        t0 = time.perf_counter()
        await handle.cancel()
        follower = await aq.submit("echo", {"text": "after"}, server=SERVER, queue=queue)

        async def timed(what: Awaitable[Any], into: list[float]) -> Any:
            result = await what
            into.append((time.perf_counter() - t0) * 1000)
            return result

        cancelled, after = await asyncio.gather(
            timed(handle.result(CALL_TIMEOUT), to_result), timed(follower.result(CALL_TIMEOUT), to_slot)
        )
        if cancelled.error_code != "cancelled" or not after.success:
            raise RuntimeError(f"cancel went wrong: {cancelled} / {after}")
        may_have_run.append(bool(cancelled.details.get("may_have_run")))

    async def all_of_them() -> None:
        async with async_queue(settings) as aq:
            await aq.call("echo", {"text": "warm"}, server=SERVER, queue=queue, wait=CALL_TIMEOUT)
            for i in range(args.cancels):
                print(f"cancel {i + 1}/{args.cancels}", file=sys.stderr)
                await once(aq)

    asyncio.run(all_of_them())
    return {
        "cancel_to_cancelled_result_ms": summarize(to_result),
        "cancel_to_next_call_result_ms": summarize(to_slot),
        "may_have_run": may_have_run,
    }


async def _running_on_the_server(handle: Any) -> None:
    """Return once the server reported progress for ``handle`` (it is running there)."""
    async for event in handle.events():
        if event.kind == "progress":
            return
        if event.kind == "result":
            raise RuntimeError(f"the call ended before it ran: {event.result}")


def render(report: dict[str, Any]) -> str:
    t, lat, c = report["throughput"], report["latency"], report["cancel"]
    sync_rate = summarize(t["sync_map_calls_per_s"])["median"]
    async_rate = summarize(t["async_gather_calls_per_s"])["median"]
    lines = [
        f"bench.aio  ({report['calls']} calls x {report['rounds']} rounds; git {report['git']})",
        "",
        "throughput, calls/s (median of rounds)",
        f"  sync ToolQueue.map            {sync_rate:8.0f}",
        f"  asyncio.gather of q.call      {async_rate:8.0f}   "
        f"ratio {t['ratio_async_over_sync']:.2f} (target >= 1)",
        f"  peak threads in the process   {t['peak_threads']:8d}   (target <= {t['thread_target']})",
        f"  RSS growth per round, MiB     {', '.join(f'{g:.1f}' for g in t['rss_growth_mib'])}",
        f"  wrong results                 {t['wrong_results']:8d}",
        "",
        "sequential latency, ms (median / p90)",
        f"  ToolQueue.call                {lat['sync_ms']['median']:8.2f} / {lat['sync_ms']['p90']:.2f}",
        f"  await AsyncToolQueue.call     {lat['async_ms']['median']:8.2f} / {lat['async_ms']['p90']:.2f}"
        f"   ratio {lat['ratio_async_over_sync']:.3f} (target <= {lat['target']})",
        "",
        "cancel of a running call, ms (median / max)",
        f"  cancel() -> cancelled result  {c['cancel_to_cancelled_result_ms']['median']:8.1f}"
        f" / {max(c['cancel_to_cancelled_result_ms']['p99'], 0):.1f}",
        "  cancel() -> next call's result on the freed slot  "
        f"{c['cancel_to_next_call_result_ms']['median']:.1f}"
        f" / {c['cancel_to_next_call_result_ms']['p99']:.1f}",
        f"  may_have_run                  {c['may_have_run']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls", type=int, default=10_000, help="calls per throughput round (default 10000)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per face (default 2)")
    parser.add_argument(
        "--latency-calls", type=int, default=300, help="sequential calls per face (default 300)"
    )
    parser.add_argument("--cancels", type=int, default=5, help="running calls cancelled (default 5)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    report = run_and_report(run, render, args)
    if report is None:
        return 130
    return 1 if report["throughput"]["wrong_results"] else 0


if __name__ == "__main__":
    sys.exit(main())
