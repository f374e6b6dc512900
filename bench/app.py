"""The Celery app the latency benchmark's worker runs: mcpq's own app plus two bench tasks.

Start a worker on it with ``python -m celery -A bench.app worker -P threads ...``:
the same process then serves ``mcpq.call_tool`` (registered by ``mcpq.worker.tasks``
through the app's ``include``) and the tasks below, so the Celery floor and
the mcpq path share broker, backend, pool and configuration.

- ``bench.noop``: the Celery floor, a task that does nothing and returns a small dict.
- ``bench.timeline``: switches on stage timestamps (received by the consumer,
  started in a pool thread, result stored) for the two tasks above, and, for
  ``mcpq.call_tool``, the time spent in each part of the task body (wrappers
  installed at worker start unless ``BENCH_INSTRUMENT=0``), and hands them
  back, so the producer can lay a call's stages on one clock.
- ``bench.split``: runs inside the worker and times the layers of one mcpq call
  (router, pool/thread hop, SDK) without the queue, to split mcpq's overhead.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
from celery import signals

from bench.stats import summarize
from mcpq.worker.celery import app
from mcpq.worker.contract.task_names import CALL_TOOL

ECHO_ARGS = {"text": "x"}


# Experiments only (``python -m bench.latency --conf KEY=VALUE``): Celery settings
# that override mcpq's own, in the producer and the worker alike.
if os.environ.get("BENCH_CELERY_CONF"):
    app.conf.update(json.loads(os.environ["BENCH_CELERY_CONF"]))


@app.task(name="bench.noop")
def noop() -> dict[str, bool]:
    if _timeline_on:  # lets the timeline split the floor's task time like mcpq's
        task_id = getattr(_current, "task_id", None)
        _mark(task_id, "body_start")
        _mark(task_id, "body_end")
    return {"ok": True}


# -- timeline: when each traced task reached each stage (CLOCK_MONOTONIC, shared by
# every process on the machine, so comparable with the producer's time.monotonic()),
# plus, for mcpq.call_tool, how long each part of the task body took in situ.

_TRACED = frozenset({"bench.noop", CALL_TOOL})
_TIMELINE_CAP = 100_000
_timeline: dict[str, dict[str, float]] = {}
_timeline_on = False
_timeline_lock = threading.Lock()
_current = threading.local()  # the traced task this pool thread is running
_sdk_times: list[float] = []  # Client.call_tool durations, appended on the loop thread


def _mark(task_id: str | None, stage: str, value: float | None = None, add: bool = False) -> None:
    if task_id is None:
        return
    value = time.monotonic() if value is None else value
    with _timeline_lock:
        if len(_timeline) < _TIMELINE_CAP or task_id in _timeline:
            marks = _timeline.setdefault(task_id, {})
            marks[stage] = marks.get(stage, 0.0) + value if add else value


@signals.task_received.connect
def _on_received(request: Any = None, **_: Any) -> None:
    if _timeline_on and request is not None and request.name in _TRACED:
        _mark(request.id, "received")


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if _timeline_on and task is not None and task.name in _TRACED:
        _current.task_id = task_id
        _mark(task_id, "prerun")


@signals.task_success.connect
def _on_success(sender: Any = None, **_: Any) -> None:
    # Sent after the SUCCESS state is stored and published.
    if _timeline_on and sender is not None and sender.name in _TRACED:
        _mark(sender.request.id, "stored")


@signals.task_postrun.connect
def _on_postrun(**_: Any) -> None:
    _current.task_id = None


def _install_probes() -> None:
    """Wrap the parts of mcpq's call path to time them per task (worker process only).

    Each wrapper costs a thread-local read when the timeline is off. Parts that a
    later version of mcpq renames are skipped, not errors.
    """
    import functools

    import mcp

    from mcpq.worker import manager as manager_mod
    from mcpq.worker import router as router_mod

    def timed(owner: Any, attr: str, stage: str, points: bool = False) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            task_id = getattr(_current, "task_id", None)
            if task_id is None:
                return original(*args, **kwargs)
            started = time.monotonic()
            if points:
                _mark(task_id, f"{stage}_start", started)
            sdk_before = len(_sdk_times)
            try:
                return original(*args, **kwargs)
            finally:
                ended = time.monotonic()
                _mark(task_id, f"d:{stage}", ended - started, add=True)
                if points:
                    _mark(task_id, f"{stage}_end", ended)
                if stage == "execute":
                    with _timeline_lock:
                        sdk = sum(_sdk_times[sdk_before:])
                    _mark(task_id, "d:sdk", sdk, add=True)

        setattr(owner, attr, wrapper)

    timed(manager_mod.MCPClientManager, "call_tool", "body", points=True)
    timed(router_mod.ToolRouter, "resolve", "resolve")
    timed(router_mod, "validate_arguments", "validate")
    timed(router_mod.ToolRouter, "_admit", "admit")
    timed(router_mod.ToolRouter, "_complete", "complete")
    timed(router_mod.ToolRouter, "_execute", "execute")
    timed(router_mod.ToolRouter, "_result", "result")

    original_call_tool = mcp.Client.call_tool

    @functools.wraps(original_call_tool)
    async def call_tool(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _timeline_on:
            return await original_call_tool(self, *args, **kwargs)
        started = time.monotonic()
        try:
            return await original_call_tool(self, *args, **kwargs)
        finally:
            elapsed = time.monotonic() - started
            with _timeline_lock:
                _sdk_times.append(elapsed)

    mcp.Client.call_tool = call_tool  # type: ignore[method-assign]


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    if os.environ.get("BENCH_INSTRUMENT", "1") != "0":
        _install_probes()


@app.task(name="bench.timeline")
def timeline(action: str) -> dict[str, dict[str, float]]:
    """``start``: record stage times from now on; ``stop``: stop, return and forget them."""
    global _timeline_on
    with _timeline_lock:
        if action == "start":
            _timeline.clear()
            _sdk_times.clear()
            _timeline_on = True
            return {}
        _timeline_on = False
        out = dict(_timeline)
        _timeline.clear()
        _sdk_times.clear()
        return out


@app.task(name="bench.split")
def split(server: str, calls: int = 300, warmup: int = 30, rounds: int = 5) -> dict[str, Any]:
    """Time one echo call layer by layer, in this worker process, from a pool thread.

    Layers (each a sequential series of echo calls, interleaved in ``rounds``):

    - ``task_body``: ``get_manager().call_tool(...).to_dict()``, i.e. what the
      ``mcpq.call_tool`` task body does (router, validation, pool, SDK, result).
    - ``pool_run``: ``pool.run(pool.with_session(server, deadline, op))`` where
      ``op`` only awaits ``client.call_tool``: thread hop + session pick + SDK.
    - ``sdk_in_pool_run``: the same calls' ``client.call_tool`` time measured on
      the loop (so ``pool_run - sdk_in_pool_run`` is the hop and pool cost).
    - ``sdk_on_loop``: ``client.call_tool`` back to back inside one coroutine on
      the worker's loop: the SDK alone, on mcpq's own session, no thread hop.
    - ``empty_hop``: ``pool.run`` of a coroutine that returns at once.
    - ``state_redis_ping``: one PING on the manager's state Redis client.
    - ``breaker_admit_complete``: the guard's two round trips (admit, then
      complete as success) without an execution claim, so a little lighter
      than a real call's; absent when the router has no guard.
    """
    from mcpq.worker.manager import get_manager

    manager = get_manager()
    pool = manager.pool
    timeout = 30.0

    def task_body() -> float:
        started = time.perf_counter()
        result = manager.call_tool("echo", dict(ECHO_ARGS), server=server).to_dict()
        elapsed = time.perf_counter() - started
        if not result["success"]:
            raise RuntimeError(f"echo failed inside the worker: {result}")
        return elapsed

    inner: list[float] = []

    def pool_run() -> float:
        async def op(client: Any) -> None:
            t0 = time.perf_counter()
            await client.call_tool("echo", dict(ECHO_ARGS))
            inner.append(time.perf_counter() - t0)

        deadline = time.monotonic() + timeout
        started = time.perf_counter()
        pool.run(pool.with_session(server, deadline, op), timeout=timeout)
        return time.perf_counter() - started

    async def nothing() -> None:
        return None

    def empty_hop() -> float:
        started = time.perf_counter()
        pool.run(nothing(), timeout=timeout)
        return time.perf_counter() - started

    async def loop_series(n: int) -> list[float]:
        out: list[float] = []

        async def op(client: Any) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                await client.call_tool("echo", dict(ECHO_ARGS))
                out.append(time.perf_counter() - t0)

        await pool.with_session(server, time.monotonic() + timeout * max(n, 1), op)
        return out

    def redis_ping() -> float:
        started = time.perf_counter()
        manager.redis.ping()
        return time.perf_counter() - started

    singles: dict[str, Callable[[], float]] = {
        "task_body": task_body,
        "pool_run": pool_run,
        "empty_hop": empty_hop,
        "state_redis_ping": redis_ping,
    }
    breaker = _breaker_pair(manager, server)
    if breaker is not None:
        singles["breaker_admit_complete"] = breaker
    samples: dict[str, list[float]] = {name: [] for name in [*singles, "sdk_in_pool_run", "sdk_on_loop"]}

    for fn in singles.values():
        for _ in range(warmup):
            fn()
    pool.run(loop_series(warmup), timeout=timeout * max(warmup, 1))
    inner.clear()

    # CPU per call of this whole process and of the stdio server it started.
    me = psutil.Process()
    servers = [p for p in me.children(recursive=True) if "mcpq.worker.demo_server" in " ".join(_cmdline(p))]

    def cpu() -> tuple[float, float]:
        own = time.process_time()
        child = 0.0
        for proc in servers:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                child += t.user + t.system
        return own, child

    cpu_used: dict[str, list[float]] = {}

    def account(name: str, before: tuple[float, float], n: int) -> None:
        after = cpu()
        used = cpu_used.setdefault(name, [0.0, 0.0, 0.0])
        used[0] += after[0] - before[0]
        used[1] += after[1] - before[1]
        used[2] += n

    per_round = max(calls // max(rounds, 1), 1)
    for _ in range(max(rounds, 1)):
        for name, fn in singles.items():
            before = cpu()
            samples[name] += [fn() for _ in range(per_round)]
            account(name, before, per_round)
        before = cpu()
        samples["sdk_on_loop"] += pool.run(loop_series(per_round), timeout=timeout * per_round)
        account("sdk_on_loop", before, per_round)
    samples["sdk_in_pool_run"] = list(inner)

    out: dict[str, Any] = {name: summarize([s * 1000 for s in values]) for name, values in samples.items()}
    out["cpu_ms_per_call"] = {
        name: {"worker": 1000 * w / n, "stdio_server": 1000 * c / n} for name, (w, c, n) in cpu_used.items()
    }
    return out


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


def _breaker_pair(manager: Any, server: str) -> Callable[[], float] | None:
    """Time ``guard.admit`` + ``guard.complete`` as the router does per call, if it does."""
    router = manager.router
    guard = getattr(router, "guard", None)
    policies = getattr(router, "policies", None)
    if guard is None or not policies or server not in policies:
        return None
    policy = policies[server]

    def pair() -> float:
        started = time.perf_counter()
        admission = guard.admit(server, policy, uuid.uuid4().hex, 60.0)
        guard.complete(server, policy, admission, "success", 0.001, "")
        return time.perf_counter() - started

    return pair
