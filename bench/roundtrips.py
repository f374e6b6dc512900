"""Count mcpq's own Redis round trips per call (happy path).

A worker serves N calls to a stdio echo tool. Its shared-state Redis is a
server of its own (the broker and result backend are on another), watched
with MONITOR: every command a client sends is one line; commands that Lua
scripts run inside Redis are marked ``lua`` and are not round trips, so they
are left out (``INFO commandstats`` would count them).

    python -m bench.roundtrips [--calls 1000] [--pool threads] [--submit each|map]

With ``--submit each`` every call is one ``ToolQueue.submit``, which also
writes the call to the ledger (one more round trip, from the producer);
with ``map`` the ledger is written once per chunk of calls.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.environment import bench_env, child_env, stdio_server, write_config
from bench.harness import WorkerProcess, stop_on_signals
from mcpq.producer.embedded_redis import EmbeddedRedis
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.settings import Settings

# Unlike the other benchmarks this one imports mcpq at module level: it never uses the
# app mcpq.worker.celery builds at import, only ToolQueue's own, from explicit settings.


class Monitor:
    """Collects every command clients send to a Redis, from a MONITOR connection."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.commands: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                if self._stop:
                    return
                self.commands.append(event)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        # One more command wakes the listener so it sees the stop flag.
        redis.Redis(connection_pool=self.client.connection_pool).ping()
        self._thread.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--submit", choices=["each", "map"], default="map")
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            return run(args)
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    """Count the round trips of ``args.calls`` calls; print them; 1 if any call failed."""
    with EmbeddedRedis() as broker, EmbeddedRedis() as state, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "servers.yaml"
        write_config(config, {"bench": stdio_server()})
        # The state Redis is a server of its own, db 0: MONITOR sees only mcpq's own commands.
        env = child_env(bench_env(broker.url, config, "rt", state_url=f"{state.url}/0"))
        worker = WorkerProcess(env, env["MCPQ_QUEUE"], 8, args.pool, app="mcpq.worker").start()
        try:
            queue = ToolQueue(Settings.from_env(env))
            queue.wait_for_worker(60)
            for _ in range(50):  # warm-up: connect, discover, publish
                assert queue.call("echo", {"text": "warm"}, timeout=30).success
            with Monitor(f"{state.url}/0") as monitor:
                started = time.perf_counter()
                if args.submit == "each":
                    handles = [queue.submit("echo", {"text": str(i)}, timeout=30) for i in range(args.calls)]
                    failed = sum(not h.result(120).success for h in handles)
                else:
                    results = queue.map("echo", [{"text": str(i)} for i in range(args.calls)], timeout=30)
                    failed = sum(not r.success for r in results)
                elapsed = time.perf_counter() - started
            queue.close()
        finally:
            worker.stop()

    sent = [c for c in monitor.commands if c.get("client_type") != "lua"]
    in_lua = len(monitor.commands) - len(sent)
    by_command = collections.Counter(str(c["command"]).split(" ", 1)[0].upper() for c in sent)
    print(
        f"calls: {args.calls} ({failed} failed) in {elapsed:.2f}s, "
        f"worker pool {args.pool}, submit {args.submit}"
    )
    print(f"round trips to the state Redis: {len(sent)} = {len(sent) / args.calls:.3f} per call")
    print(f"(commands run inside Lua scripts, not round trips: {in_lua})")
    for command, n in by_command.most_common():
        print(f"  {command:<10} {n:>7}  {n / args.calls:.3f}/call")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
